// Memory accounting, measured reconstruction error, Ada-KV concentration, rank
// analysis and low-rank profiles on disk.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <kvtrim/io/low_rank_profile.hpp>
#include <string>
#include <vector>

#include "common/structured.hpp"
#include "common/tensors.hpp"

namespace kt = kvtrim;
using namespace kvtrim::testing;

namespace {

template <class Codec>
using scheme_for =
    kt::scheme<kt::layout::contiguous, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;

constexpr kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 64};

/// A full cache (capacity tokens per head, appended) and its stats with errors.
template <class Codec>
std::pair<kt::cache_stats, std::size_t> full_cache_stats(const typename Codec::config& cfg, std::int64_t capacity) {
  auto keys = structured_tensor({1, shape.kv_heads, capacity, shape.head_dim}, 8, 0.05, 81);
  auto values = structured_tensor({1, shape.kv_heads, capacity, shape.head_dim}, 8, 0.05, 82);
  auto cache = scheme_for<Codec>::make_cache(shape, 1, capacity, cfg);
  scheme_for<Codec>::append(cache.view(), keys.cview(), values.cview());
  return {kt::stats(cache.view(), cfg, keys.cview(), values.cview()), cache.bytes()};
}

}  // namespace

TEST(Stats, BytesPerTokenOfEveryCodec) {
  constexpr std::int64_t d = 128;
  EXPECT_EQ(kt::codec::fp16::bytes_per_token({}, d), 512.0);
  // int8: codes 2·128, value scale 4, key scales 128·4 per 32 tokens + 1 flag
  // byte per 32.
  EXPECT_DOUBLE_EQ(kt::codec::int8::bytes_per_token({}, d), 256.0 + 4.0 + (512.0 + 1.0) / 32.0);
  EXPECT_DOUBLE_EQ(kt::codec::int8::bytes_per_token({.keys = kt::codec::key_scaling::per_token, .asymmetric = true}, d),
                   256.0 + 16.0);
  EXPECT_DOUBLE_EQ(kt::codec::int4::bytes_per_token({.keys = kt::codec::key_scaling::per_token}, d), 128.0 + 8.0);
  // Runs of 16 slots (pages of 16): the key scales and flag per 16 tokens.
  EXPECT_DOUBLE_EQ(kt::codec::int8::bytes_per_token({}, d, 16), 256.0 + 4.0 + (512.0 + 1.0) / 16.0);
  EXPECT_DOUBLE_EQ(kt::codec::int8::bytes_per_head({}, d),
                   32.0 * (128.0 * 2.0 + 8.0) + 8.0);  // fp16 residual window, its slots, its count
  EXPECT_EQ(kt::codec::fp8::bytes_per_token({}, d), 256.0);
  EXPECT_EQ(kt::codec::low_rank::bytes_per_token({.rank = 32}, d), 128.0);
  // Pre-RoPE: positions live in the layout, not the codec.
  EXPECT_EQ(kt::codec::low_rank::bytes_per_token({.rank = 32, .keys = kt::codec::key_space::pre_rope}, d), 128.0);
  EXPECT_EQ(kt::codec::low_rank::bytes_per_token({}, d),
            256.0);  // energy-chosen: max_rank = 64 stored
  EXPECT_EQ((kt::codec::layered<kt::codec::fp8>::bytes_per_token({}, d)), 260.0);
}

template <class Codec>
void expect_accounting_matches_allocation(const typename Codec::config& cfg) {
  constexpr std::int64_t capacity = 96;
  const auto [stats, allocated] = full_cache_stats<Codec>(cfg, capacity);
  // A full cache: the accounted bytes are what was allocated, up to the
  // carver's 256-byte alignment of each of the codec's (at most 20) arrays.
  EXPECT_LE(stats.bytes(), static_cast<double>(allocated));
  EXPECT_GE(stats.bytes(), static_cast<double>(allocated) - 20 * 256.0) << stats;
  EXPECT_EQ(stats.kept(), shape.kv_heads * capacity);
  EXPECT_DOUBLE_EQ(stats.fp16_bytes(), static_cast<double>(stats.kept()) * 4.0 * shape.head_dim);
  for (const auto& head : stats.heads) {
    EXPECT_FALSE(std::isnan(head.key_error));
    EXPECT_FALSE(std::isnan(head.value_error));
  }
}

TEST(Stats, AccountingMatchesWhatTheCacheAllocates) {
  expect_accounting_matches_allocation<kt::codec::fp16>({});
  expect_accounting_matches_allocation<kt::codec::int8>({});
  expect_accounting_matches_allocation<kt::codec::int4>({.asymmetric = true});
  expect_accounting_matches_allocation<kt::codec::fp8>({});
  expect_accounting_matches_allocation<kt::codec::low_rank>({.rank = 16});
  expect_accounting_matches_allocation<kt::codec::layered<kt::codec::int8>>({});
}

TEST(Stats, PagedRunsOf16AreCountedAsAllocated) {
  // int8 with KIVI groups of 32 in pages of 16: key scales per 16-slot run.
  using scheme = kt::scheme<kt::layout::paged, kt::score::static_window, kt::budget::uniform, kt::codec::int8,
                            kt::backend::cpu>;
  constexpr std::int64_t pages_per_head = 6, page = 16, tokens = pages_per_head * page;
  auto keys = structured_tensor({1, shape.kv_heads, tokens, shape.head_dim}, 8, 0.05, 83);
  auto cache = scheme::make_cache(shape, 1, kt::layout::paged::pool_size{shape.kv_heads * pages_per_head, page},
                                  kt::codec::int8::config{});
  scheme::append(cache.view(), keys.cview(), keys.cview());
  EXPECT_EQ(cache.view().storage.slot_run, 16);
  const kt::cache_stats stats = kt::stats(cache.view(), kt::codec::int8::config{});
  EXPECT_DOUBLE_EQ(stats.bytes_per_token, kt::codec::int8::bytes_per_token({}, shape.head_dim, 16));
  // Codec storage only (page tables and the compensation table come on top).
  const double codec_bytes = static_cast<double>(
      kt::codec::int8::storage_bytes({}, shape.kv_heads * tokens, shape.kv_heads, shape.head_dim, 16));
  EXPECT_LE(stats.bytes(), codec_bytes);
  EXPECT_GE(stats.bytes(), codec_bytes - 20 * 256.0) << stats;
}

TEST(Stats, MeasuredErrorsAndTable) {
  const auto [plain, plain_bytes] = full_cache_stats<kt::codec::fp16>({}, 32);
  for (const auto& head : plain.heads) EXPECT_LE(head.key_error, kt::element_traits<kt::half>::unit_roundoff);
  EXPECT_NEAR(plain.ratio(), 1.0, 1e-12);
  const auto [int8_stats, int8_bytes] =
      full_cache_stats<kt::codec::int8>({.keys = kt::codec::key_scaling::per_token}, 32);
  EXPECT_NEAR(int8_stats.ratio(), (128.0 + 8.0) / 256.0, 1e-12);
  for (const auto& head : int8_stats.heads) {
    EXPECT_GT(head.key_error,
              kt::element_traits<kt::half>::unit_roundoff);  // quantized: worse
                                                             // than fp16 …
    EXPECT_LT(head.key_error, 0.02);                         // … by about a step / √3 / amplitude
  }
  const std::string table = int8_stats.table();
  EXPECT_NE(table.find("codec int8"), std::string::npos) << table;
  EXPECT_NE(table.find("vs fp16"), std::string::npos) << table;
  EXPECT_NE(table.find("total"), std::string::npos) << table;
  EXPECT_NE(table.find("0.531"), std::string::npos) << table;  // the ratio
}

TEST(Concentration, FractionOfTokensHoldingNinetyPercent) {
  const float peaked[4] = {0.1f, 0.5f, 0.1f, 0.3f};
  EXPECT_DOUBLE_EQ(kt::attention_concentration(peaked, 4),
                   0.75);  // 0.5 + 0.3 + 0.1
  EXPECT_DOUBLE_EQ(kt::attention_concentration(peaked, 4, 0.8), 0.5);
  const std::vector<float> flat(10, 1.0f);
  EXPECT_DOUBLE_EQ(kt::attention_concentration(flat.data(), 10), 0.9);
  std::vector<float> tensor{1, 0, 0, 0, 1, 1, 1, 1};  // [1, 2, 4]
  const auto per_head = kt::head_concentration(
      kt::make_view(static_cast<const float*>(tensor.data()), std::array<std::int64_t, 3>{1, 2, 4}));
  ASSERT_EQ(per_head.size(), 2u);
  EXPECT_DOUBLE_EQ(per_head[0], 0.25);
  EXPECT_DOUBLE_EQ(per_head[1], 1.0);
  const float negative[2] = {0.5f, -0.1f};
  EXPECT_THROW(kt::attention_concentration(negative, 2), kt::error);
  EXPECT_THROW(kt::attention_concentration(peaked, 4, 0.0), kt::error);
}

TEST(RankAnalysis, EffectiveAndStableRank) {
  const std::vector<double> equal(5, 2.0), dominant{10.0, 0.0, 0.0};
  EXPECT_NEAR(kt::analysis::effective_rank(equal), 5.0, 1e-12);
  EXPECT_NEAR(kt::analysis::stable_rank(equal), 5.0, 1e-12);
  EXPECT_NEAR(kt::analysis::effective_rank(dominant), 1.0, 1e-12);
  EXPECT_NEAR(kt::analysis::stable_rank(dominant), 1.0, 1e-12);
  const auto curve = kt::analysis::energy_curve({3.0, 2.0, 1.0, 0.5});
  EXPECT_NEAR(curve[1], 13.0 / 14.25, 1e-12);
  EXPECT_NEAR(curve[3], 1.0, 1e-12);
  // Exact rank-5 heads: every measure sees 5 at most.
  auto keys = structured_tensor({1, 2, 50, 16}, 5, 0.0, 91, 1.0);
  const auto heads = kt::analysis::analyze_heads(keys.cview(), 0.9999);
  ASSERT_EQ(heads.size(), 2u);
  for (const auto& head : heads) {
    EXPECT_EQ(head.rank_at_energy, 5);
    EXPECT_LE(head.effective, 5.0 + 1e-6);
    EXPECT_LE(head.stable, 5.0 + 1e-6);
    EXPECT_GT(head.stable, 1.0);
  }
  EXPECT_NE(kt::analysis::rank_table(heads).find("stable rank"), std::string::npos);
}

TEST(LowRankProfile, SavesLoadsAndRefusesWrongShapes) {
  auto keys = structured_tensor({2, 2, 40, 16}, 4, 0.01, 101);
  auto values = structured_tensor({2, 2, 40, 16}, 4, 0.01, 102);
  auto profile = kt::io::low_rank_profile::empty(2, 2, 16);
  const kt::codec::low_rank::config cfg{.rank = 4, .source = kt::codec::basis_source::profile};
  profile.calibrate_layer(1, keys.cview(), values.cview(), cfg);
  EXPECT_EQ(profile.at(1, 0).key_rank, 4);
  profile.calibrate_layer(0, keys.cview(), values.cview(), cfg);

  const std::string path = (std::filesystem::temp_directory_path() / "kvtrim_low_rank_profile_test.json").string();
  profile.save(path);
  const auto loaded = kt::io::low_rank_profile::load(path);
  EXPECT_EQ(loaded.at(1, 1).key_basis, profile.at(1, 1).key_basis);

  std::vector<std::byte> memory(kt::codec::low_rank::storage_bytes(cfg, 4 * 8, 4, 16, 1));
  const auto store = kt::codec::low_rank::bind<kt::host_space>(cfg, memory.data(), 4 * 8, 4, 16, 1);
  kt::io::load_profile(store, loaded, 1, 2);
  EXPECT_EQ(store.key_ranks[3], 4);
  EXPECT_THROW(kt::io::load_profile(store, loaded, 1, 1),
               kt::error);  // 2 heads of profile vs 4 of cache / batch 1
  EXPECT_THROW(kt::io::load_profile(store, loaded, 2, 2),
               kt::error);  // no layer 2

  auto wrong_dim = kt::io::low_rank_profile::empty(2, 2, 8);
  EXPECT_THROW(wrong_dim.calibrate_layer(0, keys.cview(), values.cview(), cfg), kt::error);
  auto json = loaded.to_json();
  json["bases"][0]["key_basis"].erase(0);  // head_dim × rank − 1 entries
  EXPECT_THROW(kt::io::low_rank_profile::from_json(json), kt::error);
  json = loaded.to_json();
  json["version"] = 99;
  EXPECT_THROW(kt::io::low_rank_profile::from_json(json), kt::error);
  json = loaded.to_json();
  json["keys"] = "pre_rope";
  EXPECT_THROW(kt::io::load_profile(store, kt::io::low_rank_profile::from_json(json), 0, 2), kt::error);
  { std::ofstream(path) << "{ not json"; }
  EXPECT_THROW(kt::io::low_rank_profile::load(path), kt::error);
  std::filesystem::remove(path);
}
