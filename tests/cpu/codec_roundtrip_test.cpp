// Round trips through each codec on its own (bind, prepare_head, encode,
// decode), with the bounds each codec's math promises, and its bad inputs.
#include <gtest/gtest.h>

#include <kvtrim/io/low_rank_profile.hpp>

#include <Eigen/Dense>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "common/quantizer_ties.hpp"
#include "common/structured.hpp"
#include "common/tensors.hpp"

namespace kt = kvtrim;
using namespace kvtrim::testing;

namespace {

/// Storage of `Codec` for `heads` heads of `capacity` slots each (head h owns
/// slots h·capacity + i), bound with slot run `slot_run` (default: the codec's
/// alignment, as the contiguous layout binds it).
template <class Codec>
struct bound_codec {
  std::vector<std::byte> memory;
  typename Codec::template storage<kt::host_space> store;
  bound_codec(const typename Codec::config& cfg, std::int64_t heads, std::int64_t capacity, std::int64_t head_dim,
              std::int64_t slot_run = 0)
      : memory(Codec::storage_bytes(cfg, heads * capacity, heads, head_dim, run(cfg, slot_run))),
        store(Codec::template bind<kt::host_space>(cfg, memory.data(), heads * capacity, heads, head_dim,
                                                   run(cfg, slot_run))) {}
  static std::int64_t run(const typename Codec::config& cfg, std::int64_t slot_run) {
    return slot_run > 0 ? slot_run : kt::codec::slot_alignment<Codec>(cfg);
  }
};

/// Feeds head `head` (flattened) the tokens of x[0, head] as a compaction
/// would: prepare_head over all of them, then encode each at its slot with its
/// position.
template <class Codec>
void compact_head(const typename Codec::template storage<kt::host_space>& store, const host_tensor<float, 4>& keys,
                  const host_tensor<float, 4>& values, std::int64_t head, std::int64_t capacity) {
  const std::int64_t tokens = keys.view.extent(2);
  const auto rows = [&](std::int64_t i, float* key, float* value) {
    for (std::int64_t d = 0; d < keys.view.extent(3); ++d) {
      key[d] = keys(0, head, i, d);
      value[d] = values(0, head, i, d);
    }
  };
  kt::codec::prepare_head<Codec>(store, head, tokens, tokens, rows);
  for (std::int64_t t = 0; t < tokens; ++t)
    Codec::encode(store, head, head * capacity + t, t, &keys(0, head, t, 0), &values(0, head, t, 0));
}

constexpr double fp16_roundoff = kt::element_traits<kt::half>::unit_roundoff;

template <class Codec>
void check_integer_half_step(const typename Codec::config& cfg) {
  constexpr std::int64_t heads = 2, capacity = 64, dim = 48,
                         tokens = 50;  // group 0 sealed, group 1 still fp16
  bound_codec<Codec> codec(cfg, heads, capacity, dim);
  auto keys = random_tensor<float, 4>({1, heads, tokens, dim}, 11, 2.0f);
  auto values = random_tensor<float, 4>({1, heads, tokens, dim}, 12, 2.0f);
  for (std::int64_t d = 0; d < dim; ++d) keys(0, 0, 3, d) *= 10.0f;  // an outlier token
  for (std::int64_t head = 0; head < heads; ++head) compact_head<Codec>(codec.store, keys, values, head, capacity);
  std::vector<float> key(dim), value(dim);
  for (std::int64_t head = 0; head < heads; ++head)
    for (std::int64_t t = 0; t < tokens; ++t) {
      const std::int64_t slot = head * capacity + t;
      Codec::load_key(codec.store, head, slot, t, key.data());
      Codec::load_value(codec.store, head, slot, value.data());
      const float value_step = Codec::value_step(codec.store, slot);
      EXPECT_GT(value_step, 0.0f);
      for (std::int64_t d = 0; d < dim; ++d) {
        // Half a step, plus fp32 rounding of the dequantisation (a few ulps of
        // |x|).
        EXPECT_LE(std::abs(value[d] - values(0, head, t, d)),
                  0.5f * value_step + 4e-7f * std::abs(values(0, head, t, d)));
        const float key_step = Codec::key_step(codec.store, slot, d);
        const float exact = keys(0, head, t, d);
        if (key_step == 0.0f) {
          // Still in the fp16 residual window (the group has not filled): exact
          // fp16.
          ASSERT_TRUE(cfg.keys == kt::codec::key_scaling::per_channel_group);
          EXPECT_EQ(key[d], static_cast<float>(kt::half(exact)));
        } else {
          // Groups quantize the fp16 residual, hence the fp16 rounding term.
          const double fp16_term = cfg.keys == kt::codec::key_scaling::per_channel_group ? fp16_roundoff : 0.0;
          EXPECT_LE(std::abs(key[d] - exact), 0.5 * key_step + (fp16_term + 4e-7) * std::abs(exact))
              << "head " << head << " token " << t << " channel " << d;
        }
      }
    }
  if (cfg.keys == kt::codec::key_scaling::per_channel_group) {
    EXPECT_GT(Codec::key_step(codec.store, 0, 0), 0.0f);  // group 0 sealed
    EXPECT_EQ(Codec::key_step(codec.store, tokens - 1, 0),
              0.0f);  // group 1 waits in fp16
  }
}

}  // namespace

TEST(Int8, HalfStepBoundSymmetricKeyGroups) { check_integer_half_step<kt::codec::int8>({}); }
TEST(Int8, HalfStepBoundAsymmetricKeyGroups) { check_integer_half_step<kt::codec::int8>({.asymmetric = true}); }
TEST(Int8, HalfStepBoundPerTokenKeys) {
  check_integer_half_step<kt::codec::int8>({.keys = kt::codec::key_scaling::per_token});
}
TEST(Int4, HalfStepBoundSymmetric) { check_integer_half_step<kt::codec::int4>({.key_group = 16}); }
TEST(Int4, HalfStepBoundAsymmetricPerToken) {
  check_integer_half_step<kt::codec::int4>({.keys = kt::codec::key_scaling::per_token, .asymmetric = true});
}

TEST(Int8, StepIsTheRangeOverTheLevels) {
  // One value row [−1.27, …, 1.27]: symmetric step 0.01 exactly represents
  // every multiple.
  bound_codec<kt::codec::int8> codec({.keys = kt::codec::key_scaling::per_token}, 1, 4, 3);
  const float key[3] = {-1.27f, 0.5f, 1.27f}, value[3] = {-2.0f, 0.0f, 0.54f};
  kt::codec::int8::encode(codec.store, 0, 0, 0, key, value);
  EXPECT_FLOAT_EQ(kt::codec::int8::value_step(codec.store, 0), 2.0f / 127.0f);
  EXPECT_FLOAT_EQ(kt::codec::int8::key_step(codec.store, 0, 0), 1.27f / 127.0f);
  float out[3];
  kt::codec::int8::load_key(codec.store, 0, 0, 0, out);
  EXPECT_FLOAT_EQ(out[0], -1.27f);
  EXPECT_FLOAT_EQ(out[1], 50.0f * (1.27f / 127.0f));
}

/// integer_quantizer::rounded_quotient (the device encode's product with 1/scale, dividing only near a tie)
/// evaluated on the host against the CPU's rounding of the IEEE quotient, on quantizer_tie_inputs (ties n + ½
/// of every binade, their neighbouring floats, exact ties, random draws): bit for bit; and the product path
/// must decide nearly every random input with a finite reciprocal (else the test would pass on the division).
template <int Bits>
void expect_product_rounding_matches_division(bool asymmetric) {
  using quantizer = kt::detail::integer_quantizer<Bits>;
  std::int64_t checked = 0, mismatches = 0, random_inputs = 0, random_by_product = 0;
  for (const quantizer_input& in : quantizer_tie_inputs<Bits>(asymmetric)) {
    const typename quantizer::step step = quantizer::fit(in.lowest, in.highest, asymmetric);
    const float shifted = in.x - step.zero;  // code()'s numerator
    const float inverse = 1.0f / step.scale;
    const float expected = std::nearbyint(shifted / step.scale);
    const float got = quantizer::rounded_quotient(shifted, step.scale, inverse);
    ++checked;
    if (std::bit_cast<std::uint32_t>(got) != std::bit_cast<std::uint32_t>(expected) && ++mismatches <= 8)
      ADD_FAILURE() << "int" << Bits << (asymmetric ? " zero-point" : "") << ": (" << shifted << ") / " << step.scale
                    << " rounds to " << expected << ", the product path gives " << got;
    if (in.random && std::isfinite(inverse)) {  // a subnormal scale's reciprocal overflows: the division decides
      ++random_inputs;
      random_by_product += quantizer::product_decides(shifted * inverse);
    }
  }
  EXPECT_EQ(mismatches, 0) << "of " << checked;
  EXPECT_GT(checked, 50000);
  EXPECT_GT(random_by_product, random_inputs * 99 / 100) << "the product path decided too few random inputs";
}

TEST(Int8, DeviceProductRoundingMatchesTheDivision) {
  expect_product_rounding_matches_division<8>(false);
  expect_product_rounding_matches_division<8>(true);
}
TEST(Int4, DeviceProductRoundingMatchesTheDivision) {
  expect_product_rounding_matches_division<4>(false);
  expect_product_rounding_matches_division<4>(true);
}

TEST(Int8, KeyGroupsRefuseSlotsOutOfOrder) {
  // Tokens-major placement: token 0 of head 1 lands at slot 1, inside head 0's
  // group.
  bound_codec<kt::codec::int8> codec({}, 2, 32, 8);
  const std::vector<float> row(8, 1.0f);
  kt::codec::int8::encode(codec.store, 0, 0, 0, row.data(), row.data());
  EXPECT_THROW(kt::codec::int8::encode(codec.store, 1, 1, 0, row.data(), row.data()), kt::error);
  EXPECT_THROW(kt::codec::int8::encode(codec.store, 0, 2, 1, row.data(), row.data()),
               kt::error);  // skips slot 1
}

TEST(Int8, GroupSizeMustDivideTheSlots) {
  // Slots must be whole runs of slot_run, which must divide key_group.
  EXPECT_THROW(kt::codec::int8::storage_bytes({.key_group = 32}, 2 * 40, 2, 64, 32), kt::error);
  EXPECT_NO_THROW(kt::codec::int8::storage_bytes({.key_group = 32}, 2 * 40, 2, 64, 16));
  EXPECT_THROW(kt::codec::int8::storage_bytes({.key_group = 32}, 2 * 48, 2, 64, 12), kt::error);
  EXPECT_THROW(kt::codec::int8::storage_bytes({.key_group = 32}, 2 * 48, 2, 64, 0), kt::error);
  EXPECT_THROW(kt::codec::int8::storage_bytes({.key_group = 0}, 64, 2, 64, 1), kt::error);
  EXPECT_NO_THROW(
      kt::codec::int8::storage_bytes({.keys = kt::codec::key_scaling::per_token, .key_group = 0}, 80, 2, 64, 1));
  using scheme = kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, kt::codec::int8,
                            kt::backend::cpu>;
  // An owning contiguous cache of capacity 40 rounds its head stride up to 64
  // (whole key groups), so a capacity that is not a multiple of key_group works.
  auto cache = scheme::make_cache(kt::model_shape{4, 2, 64}, 1, 40, kt::codec::int8::config{});
  EXPECT_EQ(cache.view().capacity, 40);
  EXPECT_EQ(cache.view().map.head_stride, 64);
}

TEST(Int8, KeyGroupsCannotMoveSlotBySlot) {
  bound_codec<kt::codec::int8> grouped({}, 1, 32, 8);
  EXPECT_THROW(kt::codec::int8::move_slot(grouped.store, 0, 0, 1), kt::error);
}

template <class Codec>
void expect_non_finite_refused(const typename Codec::config& cfg) {
  bound_codec<Codec> codec(cfg, 1, 32, 8);
  std::vector<float> good(8, 0.5f), bad = good;
  for (float poison : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity()}) {
    bad[5] = poison;
    try {
      Codec::encode(codec.store, 0, 0, 0, bad.data(), good.data());
      ADD_FAILURE() << "accepted " << poison << " in a key";
    } catch (const kt::error& e) {
      EXPECT_NE(std::string(e.what()).find("finite values"), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("channel 5"), std::string::npos) << e.what();
    }
    EXPECT_THROW(Codec::encode(codec.store, 0, 0, 0, good.data(), bad.data()), kt::error);
  }
}

TEST(BadInputs, NonFiniteValuesAreAnError) {
  expect_non_finite_refused<kt::codec::int8>({});
  expect_non_finite_refused<kt::codec::int4>({});
  expect_non_finite_refused<kt::codec::fp8>({});
  expect_non_finite_refused<kt::codec::low_rank>({.rank = 2});
  expect_non_finite_refused<kt::codec::layered<kt::codec::int8>>({});
}

// ---- fp8
// -----------------------------------------------------------------------

TEST(Fp8, EveryCodeRoundTripsAndRoundingIsToNearestEven) {
  for (unsigned bits = 0; bits < 256; ++bits) {
    if ((bits & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(kt::detail::from_e4m3(static_cast<std::uint8_t>(bits))));
      continue;
    }
    const float value = kt::detail::from_e4m3(static_cast<std::uint8_t>(bits));
    if (bits == 0x80) continue;  // −0 encodes as −0: same bits
    EXPECT_EQ(kt::detail::to_e4m3(value), bits) << value;
  }
  EXPECT_EQ(kt::detail::from_e4m3(0x7E), 448.0f);
  EXPECT_EQ(kt::detail::from_e4m3(0x01), std::ldexp(1.0f, -9));
  // A NaN quotient (0 / 0 under a zero scale) is the device's code, not a float-to-integer cast (UBSan).
  const float zero = 0.0f;
  volatile float zero_scale = 0.0f;  // no constant folding: the runtime 0/0, negative on x86
  EXPECT_EQ(kt::detail::to_e4m3(zero / zero_scale), 0x7Fu);
  EXPECT_EQ(kt::detail::to_e4m3(-std::numeric_limits<float>::quiet_NaN()), 0x7Fu);
  EXPECT_EQ(kt::detail::from_e4m3(kt::detail::to_e4m3(1.0625f)),
            1.0f);  // tie → even mantissa 000
  EXPECT_EQ(kt::detail::from_e4m3(kt::detail::to_e4m3(1.1875f)),
            1.25f);  // tie → even mantissa 010
  EXPECT_EQ(kt::detail::from_e4m3(kt::detail::to_e4m3(1000.0f)),
            448.0f);  // saturates
  EXPECT_EQ(kt::detail::from_e4m3(kt::detail::to_e4m3(-464.0f)), -448.0f);
  EXPECT_EQ(kt::detail::from_e4m3(kt::detail::to_e4m3(std::ldexp(1.0f, -11))),
            0.0f);  // below half the least subnormal
}

/// detail::e4m3_quotient (the fp8 device encode's x · 1/scale, dividing only near an e4m3 midpoint) evaluated
/// on the host against the CPU's to_e4m3(x / scale), on e4m3_quotient_inputs (every midpoint of every binade
/// and its float neighbours, quotients across the margin, the subnormal and saturation ranges, zeros, FLT_MAX,
/// random draws, scales of every binade including fp32 subnormals): the same code, bit for bit. The test
/// would pass on the division alone, so it also asks that the product decides nearly every random input with
/// a normal reciprocal and a finite product, and that the product's code was taken on many inputs where the
/// product differs from the quotient (a margin of 0 fails here: see fp8.hpp).
TEST(Fp8, DeviceProductRoundingMatchesTheDivision) {
  namespace d = kt::detail;
  std::int64_t checked = 0, mismatches = 0, random_inputs = 0, random_by_product = 0, differing_by_product = 0;
  for (const e4m3_input& in : e4m3_quotient_inputs()) {
    const float inverse = d::e4m3_inverse(in.scale);
    const float quotient = in.x / in.scale;
    const std::uint8_t expected = d::to_e4m3(quotient);
    const std::uint8_t got = d::to_e4m3(d::e4m3_quotient(in.x, in.scale, inverse));
    ++checked;
    if (got != expected && ++mismatches <= 8)
      ADD_FAILURE() << std::hexfloat << in.x << " / " << in.scale << " = " << quotient << ": e4m3 0x" << std::hex
                    << int{expected} << ", the product path (" << std::hexfloat << in.x * inverse << ") gives 0x"
                    << std::hex << int{got} << std::dec << std::defaultfloat;
    const float product = in.x * inverse;
    const bool decides = d::e4m3_product_decides(product);
    if (in.random && std::isfinite(product)) ++random_inputs, random_by_product += decides;
    differing_by_product += decides && std::bit_cast<std::uint32_t>(product) != std::bit_cast<std::uint32_t>(quotient);
  }
  EXPECT_EQ(mismatches, 0) << "of " << checked;
  EXPECT_GT(checked, 2000000);
  EXPECT_GT(random_by_product, random_inputs * 99 / 100) << "the product path decided too few random inputs";
  EXPECT_GT(differing_by_product, 10000) << "too few inputs where the product differs from the quotient";
  // The inverse: NaN where 1/scale is not a normal float, so that the division decides.
  EXPECT_TRUE(std::isnan(d::e4m3_inverse(0.0f)));
  EXPECT_TRUE(std::isnan(d::e4m3_inverse(0x1p+127f)));     // 2⁻¹²⁷: subnormal
  EXPECT_TRUE(std::isnan(d::e4m3_inverse(0x1p-149f)));     // ∞
  EXPECT_EQ(d::e4m3_inverse(0x1.8p-127f), 1.0f / 0x1.8p-127f);  // a subnormal scale with a normal inverse
  EXPECT_EQ(d::e4m3_inverse(0.1f), 1.0f / 0.1f);
  EXPECT_EQ(d::to_e4m3(d::e4m3_quotient(1.0f, 0.0f, d::e4m3_inverse(0.0f))), 0x7E);  // ∞ saturates, as 1 / 0
}

TEST(Fp8, WithinE4m3PrecisionWithHeadScales) {
  constexpr std::int64_t heads = 2, capacity = 64, dim = 32;
  bound_codec<kt::codec::fp8> codec({}, heads, capacity, dim);
  auto keys = random_tensor<float, 4>({1, heads, capacity, dim}, 21, 3.0f);
  auto values = random_tensor<float, 4>({1, heads, capacity, dim}, 22, 0.01f);
  for (std::int64_t head = 0; head < heads; ++head)
    compact_head<kt::codec::fp8>(codec.store, keys, values, head, capacity);
  std::vector<float> key(dim), value(dim);
  for (std::int64_t head = 0; head < heads; ++head) {
    const float key_scale = codec.store.key_scales[head], value_scale = codec.store.value_scales[head];
    for (std::int64_t t = 0; t < capacity; ++t) {
      kt::codec::fp8::load_key(codec.store, head, head * capacity + t, t, key.data());
      kt::codec::fp8::load_value(codec.store, head, head * capacity + t, value.data());
      for (std::int64_t d = 0; d < dim; ++d) {
        const double k = keys(0, head, t, d), v = values(0, head, t, d);
        // Half an ulp of 3 mantissa bits, or half the least subnormal (2^−10),
        // in scaled units; + fp32 slack.
        EXPECT_LE(std::abs(key[d] - k), key_scale * std::max(std::abs(k / key_scale) / 16.0, 0x1p-10) * (1 + 1e-6));
        EXPECT_LE(std::abs(value[d] - v),
                  value_scale * std::max(std::abs(v / value_scale) / 16.0, 0x1p-10) * (1 + 1e-6));
      }
    }
  }
}

/// head_amax on heads of tiny values: max|x| / 448 would be 0 (subnormal inputs: x / 0 = ±∞ saturates,
/// 0 / 0 = NaN decodes to NaN) or a subnormal scale; the scale is floored at 2⁻¹²⁶ (detail::e4m3_head_scale).
/// Head 0 holds fp32 subnormals and zeros, head 1 keys just below 448·2⁻¹²⁶ (a subnormal max|x| / 448) and
/// values above the floor (unchanged: max|x| / 448), head 2 zeros (keeps its scale).
TEST(Fp8, TinyHeadsTakeTheSmallestNormalScale) {
  namespace kd = kt::detail;
  constexpr std::int64_t heads = 3, capacity = 8, dim = 16;
  bound_codec<kt::codec::fp8> codec({}, heads, capacity, dim);
  auto keys = make_tensor<float, 4>({1, heads, capacity, dim});
  auto values = make_tensor<float, 4>({1, heads, capacity, dim});
  const float tiny[] = {1e-44f, -1e-44f, 3e-45f, -3e-45f, 0.0f, -0.0f, 0x1p-149f, -0x1p-149f};
  const float small_keys[] = {0x1.9p-118f, -0x1.8p-120f, 0x1p-126f, 0x1p-130f, -0x1p-140f, 0.0f, 1e-44f, 0x1.2p-122f};
  for (std::int64_t t = 0; t < capacity; ++t)
    for (std::int64_t d = 0; d < dim; ++d) {
      keys(0, 0, t, d) = tiny[(t + d) % 8];
      values(0, 0, t, d) = tiny[(3 * t + d + 1) % 8];
      keys(0, 1, t, d) = small_keys[(t + d) % 8];  // max 0x1.9p-118 = 400·2⁻¹²⁶
      values(0, 1, t, d) = small_keys[(t + d) % 8] * 0x1p+20f;
      keys(0, 2, t, d) = values(0, 2, t, d) = 0.0f;
    }
  for (std::int64_t head = 0; head < heads; ++head)
    compact_head<kt::codec::fp8>(codec.store, keys, values, head, capacity);
  EXPECT_EQ(kd::e4m3_min_scale, std::numeric_limits<float>::min());
  EXPECT_EQ(codec.store.key_scales[0], 0x1p-126f);
  EXPECT_EQ(codec.store.value_scales[0], 0x1p-126f);
  EXPECT_EQ(codec.store.key_scales[1], 0x1p-126f);
  EXPECT_EQ(codec.store.value_scales[1], static_cast<float>(0x1.9p-98 / 448.0));  // above the floor
  EXPECT_EQ(codec.store.key_scales[2], 1.0f);  // all zero: the scale bound
  EXPECT_EQ(codec.store.value_scales[2], 1.0f);
  std::vector<float> key(dim), value(dim);
  for (std::int64_t head = 0; head < heads; ++head) {
    const float key_scale = codec.store.key_scales[head], value_scale = codec.store.value_scales[head];
    // The device's product path (no division per element) stays open: a normal inverse.
    EXPECT_FALSE(std::isnan(kd::e4m3_inverse(key_scale))) << head;
    EXPECT_FALSE(std::isnan(kd::e4m3_inverse(value_scale))) << head;
    for (std::int64_t t = 0; t < capacity; ++t) {
      const std::int64_t slot = head * capacity + t;
      kt::codec::fp8::load_key(codec.store, head, slot, t, key.data());
      kt::codec::fp8::load_value(codec.store, head, slot, value.data());
      for (std::int64_t d = 0; d < dim; ++d) {
        const auto check = [&](float got, float x, float scale, std::uint8_t code, const char* what) {
          SCOPED_TRACE(::testing::Message() << what << " head " << head << " token " << t << " channel " << d << " x "
                                          << std::hexfloat << x);
          ASSERT_TRUE(std::isfinite(got));
          if (x == 0.0f) {
            EXPECT_EQ(got, 0.0f);
          }
          const double q = std::abs(static_cast<double>(x) / scale);
          if (scale == kd::e4m3_min_scale) {
            EXPECT_LT(q, kd::e4m3_max);  // at the floor nothing saturates
          }
          EXPECT_LE(std::abs(static_cast<double>(got) - x), scale * std::max(q / 16.0, 0x1p-10));
          // The device's encode (product with the inverse) gives the stored code.
          EXPECT_EQ(kd::to_e4m3(kd::e4m3_quotient(x, scale, kd::e4m3_inverse(scale))), code);
        };
        check(key[d], keys(0, head, t, d), key_scale, codec.store.key_codes[slot * dim + d], "key");
        check(value[d], values(0, head, t, d), value_scale, codec.store.value_codes[slot * dim + d], "value");
      }
    }
  }
}

TEST(Fp8, LargerThanTheRangeSaturates) {
  bound_codec<kt::codec::fp8> codec({.scales = kt::codec::fp8_scaling::fixed, .key_scale = 0.5f}, 1, 4, 2);
  const float key[2] = {1000.0f, -300.0f}, value[2] = {1.0f, 2.0f};
  kt::codec::fp8::encode(codec.store, 0, 0, 0, key, value);
  float out[2];
  kt::codec::fp8::load_key(codec.store, 0, 0, 0, out);
  EXPECT_EQ(out[0], 224.0f);  // 448 · 0.5
  EXPECT_EQ(out[1], -224.0f);
  EXPECT_THROW(kt::codec::fp8::set_head_scales(codec.store, 0, 0.0f, 1.0f), kt::error);
  EXPECT_THROW(kt::codec::fp8::set_head_scales(codec.store, 3, 1.0f, 1.0f), kt::error);
}

// ---- low rank
// --------------------------------------------------------------------

namespace {
std::vector<double> head_singular_values(const host_tensor<float, 4>& x, std::int64_t head) {
  return kt::analysis::singular_values(kt::analysis::head_matrix(x.cview(), 0, head));
}
}  // namespace

TEST(LowRank, ErrorEqualsTheDiscardedSingularEnergy) {
  constexpr std::int64_t dim = 64, tokens = 200, rank = 10;
  auto keys = structured_tensor({1, 1, tokens, dim}, rank, 0.1, 31);
  auto values = structured_tensor({1, 1, tokens, dim}, rank, 0.1, 32);
  for (std::int64_t kept : {4, 10, 20}) {
    bound_codec<kt::codec::low_rank> codec({.rank = kept}, 1, tokens, dim);
    compact_head<kt::codec::low_rank>(codec.store, keys, values, 0, tokens);
    EXPECT_EQ(codec.store.key_ranks[0], kept);
    double key_error = 0.0, value_error = 0.0;
    std::vector<float> row(dim);
    for (std::int64_t t = 0; t < tokens; ++t) {
      kt::codec::low_rank::load_key(codec.store, 0, t, t, row.data());
      for (std::int64_t d = 0; d < dim; ++d) key_error += std::pow(row[d] - keys(0, 0, t, d), 2);
      kt::codec::low_rank::load_value(codec.store, 0, t, row.data());
      for (std::int64_t d = 0; d < dim; ++d) value_error += std::pow(row[d] - values(0, 0, t, d), 2);
    }
    const auto discarded = [&](const std::vector<double>& singular) {
      double sum = 0.0;
      for (std::size_t i = static_cast<std::size_t>(kept); i < singular.size(); ++i) sum += singular[i] * singular[i];
      return sum;
    };
    // fp16 coefficients add ≈ ‖K‖²·u²/3 ≈ 4e-8·‖K‖² of error, ≤ 1e-3 of the
    // discarded energy here.
    EXPECT_NEAR(key_error, discarded(head_singular_values(keys, 0)), 1e-3 * discarded(head_singular_values(keys, 0)));
    EXPECT_NEAR(value_error, discarded(head_singular_values(values, 0)),
                1e-3 * discarded(head_singular_values(values, 0)));
  }
}

TEST(LowRank, EnergyThresholdPicksTheSmallestRankReachingIt) {
  const std::vector<double> singular{3.0, 2.0, 1.0, 0.5};      // energies 9, 4, 1, 0.25 of 14.25
  EXPECT_EQ(kt::analysis::rank_for_energy(singular, 0.6), 1);  // e1 = 0.6316
  EXPECT_EQ(kt::analysis::rank_for_energy(singular, 0.6317),
            2);                                                 // just above e1
  EXPECT_EQ(kt::analysis::rank_for_energy(singular, 0.98), 3);  // e3 = 0.98246
  EXPECT_EQ(kt::analysis::rank_for_energy(singular, 0.9825), 4);
  EXPECT_EQ(kt::analysis::rank_for_energy(singular, 1.0), 4);
  EXPECT_THROW(kt::analysis::rank_for_energy(singular, 0.0), kt::error);
  EXPECT_THROW(kt::analysis::rank_for_energy(singular, 1.5), kt::error);

  // The codec fits exactly that rank to each head's keys and values.
  constexpr std::int64_t dim = 32, tokens = 100;
  auto keys = structured_tensor({1, 1, tokens, dim}, 12, 0.02, 41, 0.7);
  auto values = structured_tensor({1, 1, tokens, dim}, 12, 0.02, 42, 0.7);
  for (double energy : {0.9, 0.98, 0.999}) {
    bound_codec<kt::codec::low_rank> codec({.energy = energy, .max_rank = dim}, 1, tokens, dim);
    compact_head<kt::codec::low_rank>(codec.store, keys, values, 0, tokens);
    EXPECT_EQ(codec.store.key_ranks[0], kt::analysis::rank_for_energy(head_singular_values(keys, 0), energy));
    EXPECT_EQ(codec.store.value_ranks[0], kt::analysis::rank_for_energy(head_singular_values(values, 0), energy));
  }
  bound_codec<kt::codec::low_rank> capped({.energy = 0.999, .max_rank = 3}, 1, tokens, dim);
  compact_head<kt::codec::low_rank>(capped.store, keys, values, 0, tokens);
  EXPECT_EQ(capped.store.key_ranks[0], 3);
}

TEST(LowRank, RefreshBuildsTheBasisFromAppendedTokensAndKeepsOldCoefficients) {
  constexpr std::int64_t dim = 16, tokens = 24;
  auto keys = structured_tensor({1, 1, tokens, dim}, 3, 0.0, 51);
  auto values = structured_tensor({1, 1, tokens, dim}, 3, 0.0, 52);
  bound_codec<kt::codec::low_rank> codec({.rank = 6, .update_freq = 8}, 1, tokens, dim);
  std::vector<float> row(dim);
  for (std::int64_t t = 0; t < tokens; ++t) {
    kt::codec::low_rank::encode(codec.store, 0, t, t, &keys(0, 0, t, 0), &values(0, 0, t, 0));  // append, no prefill
    if (t == 6) {
      EXPECT_EQ(codec.store.key_ranks[0],
                0);  // no basis before the first refresh
    }
    if (t == 7) {
      EXPECT_EQ(codec.store.key_ranks[0],
                3);  // the data's rank: no directions of zero energy added
    }
  }
  for (std::int64_t t = 0; t < tokens; ++t) {  // exact rank 3 data: every token back to fp16 accuracy
    kt::codec::low_rank::load_key(codec.store, 0, t, t, row.data());
    for (std::int64_t d = 0; d < dim; ++d)
      EXPECT_NEAR(row[d], keys(0, 0, t, d), 4 * fp16_roundoff * 8.0) << "token " << t;
  }

  // New directions appear after compaction: the basis grows, old coefficients
  // stay.
  auto shifted = structured_tensor({1, 1, 8, dim}, 5, 0.0, 53);
  bound_codec<kt::codec::low_rank> grown({.energy = 0.999, .max_rank = 12, .update_freq = 8}, 1, tokens + 8, dim);
  compact_head<kt::codec::low_rank>(grown.store, keys, values, 0, tokens + 8);
  const std::int32_t before = grown.store.key_ranks[0];
  std::vector<kt::half> kept_coefficients(grown.store.key_coefficients, grown.store.key_coefficients + 12);
  for (std::int64_t t = 0; t < 8; ++t)
    kt::codec::low_rank::encode(grown.store, 0, tokens + t, tokens + t, &shifted(0, 0, t, 0), &shifted(0, 0, t, 0));
  EXPECT_GT(grown.store.key_ranks[0], before);
  for (std::int64_t j = 0; j < 12; ++j) EXPECT_EQ(grown.store.key_coefficients[j], kept_coefficients[j]);
  double error = 0.0, norm = 0.0;
  for (std::int64_t t = 0; t < 8; ++t) {
    kt::codec::low_rank::load_key(grown.store, 0, tokens + t, tokens + t, row.data());
    for (std::int64_t d = 0; d < dim; ++d) {
      error += std::pow(row[d] - shifted(0, 0, t, d), 2);
      norm += std::pow(shifted(0, 0, t, d), 2);
    }
  }
  EXPECT_LE(error,
            (1.0 - 0.999) * norm * 1.01);  // the refreshed basis holds ≥ 99.9% of their energy
}

TEST(LowRank, PreRopeBasesBeatPostRopeBasesOnRotatedLowRankKeys) {
  // Rank-12 pre-RoPE keys; the engine's cache holds them rotated to positions
  // 0…255.
  constexpr std::int64_t dim = 64, tokens = 256, rank = 12;
  const kt::rope rope{};
  auto pre = structured_tensor({1, 1, tokens, dim}, rank, 0.02, 111, 0.9);
  auto post = pre;
  post.view.data = post.storage.data();
  apply_rope_in_double(post, rope.theta, rope.rotary_dim, false);
  const auto key_error = [&](const kt::codec::low_rank::config& cfg, const host_tensor<float, 4>& given) {
    bound_codec<kt::codec::low_rank> codec(cfg, 1, tokens, dim);
    compact_head<kt::codec::low_rank>(codec.store, given, given, 0, tokens);
    double error = 0.0, norm = 0.0;
    std::vector<float> row(dim);
    for (std::int64_t t = 0; t < tokens; ++t) {
      kt::codec::low_rank::load_key(codec.store, 0, t, t, row.data());  // post-RoPE in both cases
      for (std::int64_t d = 0; d < dim; ++d) {
        error += std::pow(row[d] - post(0, 0, t, d), 2);
        norm += std::pow(post(0, 0, t, d), 2);
      }
    }
    return std::sqrt(error / norm);
  };
  const double pre_error = key_error({.rank = rank, .keys = kt::codec::key_space::pre_rope, .rope = rope}, pre);
  const double post_error = key_error({.rank = rank}, post);
  EXPECT_LT(pre_error,
            0.05);  // the noise floor: 0.02 noise against unit-scale signal
  EXPECT_GT(post_error,
            5.0 * pre_error);  // RoPE spreads 12 directions over many more
  const auto post_rank = kt::analysis::rank_for_energy(head_singular_values(post, 0), 0.98);
  const auto pre_rank = kt::analysis::rank_for_energy(head_singular_values(pre, 0), 0.98);
  EXPECT_LE(pre_rank, rank);
  EXPECT_GT(post_rank, 2 * pre_rank);
}

TEST(LowRank, BadRanksAndBases) {
  EXPECT_THROW(kt::codec::low_rank::storage_bytes({.rank = 0}, 8, 1, 16, 1), kt::error);
  EXPECT_THROW(kt::codec::low_rank::storage_bytes({.rank = 17}, 8, 1, 16, 1), kt::error);
  EXPECT_THROW(kt::codec::low_rank::storage_bytes({.max_rank = 32}, 8, 1, 16, 1), kt::error);
  EXPECT_THROW(kt::codec::low_rank::storage_bytes({.energy = 0.0}, 8, 1, 16, 1), kt::error);
  EXPECT_THROW(kt::codec::low_rank::storage_bytes(
                   {.rank = 4, .keys = kt::codec::key_space::pre_rope, .rope = {.rotary_dim = 7}}, 8, 1, 16, 1),
               kt::error);
  bound_codec<kt::codec::low_rank> codec({.rank = 2, .source = kt::codec::basis_source::profile}, 1, 4, 3);
  const std::vector<float> row(3, 1.0f);
  EXPECT_THROW(kt::codec::low_rank::encode(codec.store, 0, 0, 0, row.data(), row.data()),
               kt::error);  // no basis yet
  const float identity2[6] = {1, 0, 0, 1, 0, 0}, skewed[6] = {1, 1, 0, 1, 0, 0},
              identity3[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
  EXPECT_THROW(kt::codec::low_rank::set_basis(codec.store, 0, identity3, 3, identity2, 2),
               kt::error);  // rank 3 > 2
  EXPECT_THROW(kt::codec::low_rank::set_basis(codec.store, 0, skewed, 2, identity2, 2),
               kt::error);  // not orthonormal
  EXPECT_THROW(kt::codec::low_rank::set_basis(codec.store, 1, identity2, 2, identity2, 2),
               kt::error);  // no head 1
  kt::codec::low_rank::set_basis(codec.store, 0, identity2, 2, identity2, 2);
  const float key[3] = {0.5f, -2.0f, 7.0f};
  kt::codec::low_rank::encode(codec.store, 0, 0, 0, key, key);
  float out[3];
  kt::codec::low_rank::load_key(codec.store, 0, 0, 0, out);
  EXPECT_EQ(out[0], 0.5f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 0.0f);  // outside the basis
}

// A refused basis installation leaves every head's bases as they were: set_basis checks the value
// basis before writing the key basis, and io::load_profile checks every head before the first.
TEST(LowRank, RefusedBasesLeaveTheStorageAsItWas) {
  bound_codec<kt::codec::low_rank> codec({.rank = 2, .source = kt::codec::basis_source::profile}, 2, 4, 3);
  const float identity2[6] = {1, 0, 0, 1, 0, 0}, other2[6] = {0, 1, 1, 0, 0, 0}, skewed[6] = {1, 1, 0, 1, 0, 0};
  for (std::int64_t head = 0; head < 2; ++head)
    kt::codec::low_rank::set_basis(codec.store, head, identity2, 2, identity2, 2);
  const std::vector<std::byte> before = codec.memory;
  // A valid key basis with an invalid value basis: nothing written.
  EXPECT_THROW(kt::codec::low_rank::set_basis(codec.store, 0, other2, 2, skewed, 2), kt::error);
  EXPECT_TRUE(codec.memory == before) << "set_basis wrote the key basis of a refused call";
  // A profile whose head 1 is not orthonormal: head 0 (valid, different) is not installed either.
  auto profile = kt::io::low_rank_profile::empty(1, 2, 3);
  profile.at(0, 0) = {.key_rank = 2, .key_basis = {other2, other2 + 6}, .value_rank = 2, .value_basis = {other2, other2 + 6}};
  profile.at(0, 1) = {.key_rank = 2, .key_basis = {skewed, skewed + 6}, .value_rank = 2, .value_basis = {identity2, identity2 + 6}};
  try {
    kt::io::load_profile(codec.store, profile, 0, 1);
    ADD_FAILURE() << "a non-orthonormal basis was accepted";
  } catch (const kt::error& e) {
    EXPECT_NE(std::string(e.what()).find("kv head 1"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(codec.memory == before) << "load_profile installed a head of a refused profile";
  // The same profile with head 1 repaired installs both heads.
  profile.at(0, 1).key_basis = {identity2, identity2 + 6};
  kt::io::load_profile(codec.store, profile, 0, 1);
  EXPECT_EQ(codec.store.key_bases[0 * 3 * 2 + 0 * 2 + 1], 1.0f);  // head 0's first column is other2's (0, 1, 0)
  EXPECT_EQ(codec.store.key_bases[0 * 3 * 2 + 1 * 2 + 0], 1.0f);
}

TEST(Rope, MatchesTheFormulaAndInverts) {
  for (auto pairs : {kt::rope::pairing::half_split, kt::rope::pairing::interleaved}) {
    const kt::rope rope{.theta = 10000.0, .rotary_dim = 12, .pairs = pairs};
    auto keys = random_tensor<float, 4>({1, 1, 40, 16}, 61);
    auto rotated = keys;
    rotated.view.data = rotated.storage.data();
    apply_rope_in_double(rotated, rope.theta, rope.rotary_dim, pairs == kt::rope::pairing::interleaved);
    for (std::int64_t t = 0; t < 40; ++t) {
      std::vector<float> row(&keys(0, 0, t, 0), &keys(0, 0, t, 0) + 16);
      rope.apply(row.data(), 16, t);
      for (std::int64_t d = 0; d < 16; ++d) EXPECT_NEAR(row[d], rotated(0, 0, t, d), 1e-5);
      rope.apply(row.data(), 16, t, -1);
      for (std::int64_t d = 0; d < 16; ++d) EXPECT_NEAR(row[d], keys(0, 0, t, d), 1e-5);
    }
  }
}

// ---- layered
// ---------------------------------------------------------------------

TEST(Layered, SinksAndNewestInFp16TheRestCrossIntoTheInnerCodec) {
  using codec = kt::codec::layered<kt::codec::int8>;
  constexpr std::int64_t dim = 16, capacity = 64, sinks = 4, recent = 8;
  bound_codec<codec> layered({.recent = recent, .sinks = sinks}, 1, capacity, dim);
  auto keys = random_tensor<float, 4>({1, 1, capacity, dim}, 71);
  auto values = random_tensor<float, 4>({1, 1, capacity, dim}, 72);
  std::vector<float> key(dim), value(dim);
  const auto check = [&](std::int64_t held) {
    for (std::int64_t t = 0; t < held; ++t) {
      const bool fp16 = t < sinks || t >= held - recent;
      EXPECT_EQ(codec::in_fp16(layered.store, t), fp16) << "token " << t << " of " << held;
      codec::load_key(layered.store, 0, t, t, key.data());
      codec::load_value(layered.store, 0, t, value.data());
      if (fp16) {
        for (std::int64_t d = 0; d < dim; ++d) {
          EXPECT_EQ(key[d], static_cast<float>(kt::half(keys(0, 0, t, d))));
          EXPECT_EQ(value[d], static_cast<float>(kt::half(values(0, 0, t, d))));
        }
      } else {  // as int8 alone would store it
        std::vector<float> inner(dim);
        kt::codec::int8::load_value(layered.store.inner, 0, t, inner.data());
        EXPECT_EQ(value, inner);
      }
    }
  };
  for (std::int64_t t = 0; t < 40; ++t) {
    codec::encode(layered.store, 0, t, t, &keys(0, 0, t, 0), &values(0, 0, t, 0));
    if (t == 9 || t == 20 || t == 39) check(t + 1);
  }
  // A token moved by a layout (flat's repack) keeps its fp16 row.
  bound_codec<kt::codec::layered<kt::codec::fp8>> moved({.recent = 2, .sinks = 0}, 1, 8, dim);
  for (std::int64_t t = 0; t < 3; ++t)
    kt::codec::layered<kt::codec::fp8>::encode(moved.store, 0, t, t, &keys(0, 0, t, 0), &values(0, 0, t, 0));
  kt::codec::layered<kt::codec::fp8>::move_slot(moved.store, 0, 2, 6);
  kt::codec::layered<kt::codec::fp8>::load_key(moved.store, 0, 6, 2, key.data());
  EXPECT_EQ(key[0], static_cast<float>(kt::half(keys(0, 0, 2, 0))));
  EXPECT_EQ(moved.store.row_slots[0],
            6);  // token 2 took ring row 0 (from token 0); the row follows it
}

TEST(Layered, BadWindows) {
  using codec = kt::codec::layered<kt::codec::fp16>;
  EXPECT_THROW(codec::storage_bytes({.recent = -1}, 8, 1, 16, 1), kt::error);
  EXPECT_THROW(codec::storage_bytes({.sinks = -2}, 8, 1, 16, 1), kt::error);
}
