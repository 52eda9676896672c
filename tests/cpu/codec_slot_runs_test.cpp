// Slot runs (docs/composition.md §3): KIVI key groups are logical per head, so
// a layout may put a head's tokens in any aligned runs of U slots (U dividing
// key_group) — pages of 16 with groups of 32, regions moved by a repack — and
// the codec stores exactly what it stores for one contiguous run per head.
// Also: positions are given, not counted (pre-RoPE low rank rotates by the
// position it is given), and the paged layout with page 16 and the default
// int8 works end to end.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <vector>

#include "common/structured.hpp"
#include "common/tensors.hpp"

namespace kt = kvtrim;
using namespace kvtrim::testing;

namespace {

template <class Codec>
struct bound {
  std::vector<std::byte> memory;
  typename Codec::template storage<kt::host_space> store;
  bound(const typename Codec::config& cfg, std::int64_t slots, std::int64_t heads, std::int64_t head_dim,
        std::int64_t slot_run)
      : memory(Codec::storage_bytes(cfg, slots, heads, head_dim, slot_run)),
        store(Codec::template bind<kt::host_space>(cfg, memory.data(), slots, heads, head_dim, slot_run)) {}
};

constexpr std::int64_t heads = 2, dim = 24, group = 32;

/// Where head h's logical token i lives: a contiguous run per head (the
/// reference), or pages of `page` slots handed out in a scrambled order so a
/// head's pages are never adjacent.
struct placement {
  std::int64_t page = 0;  // 0: contiguous, head h at h·capacity
  std::int64_t capacity = 0;
  std::vector<std::vector<std::int64_t>> pages;  // per head

  static placement contiguous(std::int64_t capacity) { return {0, capacity, {}}; }
  static placement paged(std::int64_t page, std::int64_t capacity) {
    placement result{page, capacity, std::vector<std::vector<std::int64_t>>(heads)};
    const std::int64_t per_head = capacity / page, total = heads * per_head;
    // Page k of head h: a stride-coprime scramble of [0, total).
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t k = 0; k < per_head; ++k) result.pages[h].push_back(((k * heads + h) * 7 + 3) % total);
    return result;
  }
  std::int64_t slots() const { return heads * capacity; }
  std::int64_t slot(std::int64_t h, std::int64_t i) const {
    if (page == 0) return h * capacity + i;
    return pages[h][i / page] * page + i % page;
  }
};

/// Writes tokens [0, count) of every head as a layout would: a compaction of
/// the first `compacted` tokens head by head (prepare_head first), then the
/// rest appended token by token across heads.
template <class Codec>
void write_tokens(const typename Codec::template storage<kt::host_space>& store, const placement& where,
                  const host_tensor<float, 4>& keys, const host_tensor<float, 4>& values, std::int64_t compacted,
                  std::int64_t count) {
  for (std::int64_t h = 0; h < heads; ++h) {
    const auto rows = [&](std::int64_t i, float* key, float* value) {
      for (std::int64_t d = 0; d < dim; ++d) {
        key[d] = keys(0, h, i, d);
        value[d] = values(0, h, i, d);
      }
    };
    kt::codec::prepare_head<Codec>(store, h, compacted, compacted, rows);
    for (std::int64_t i = 0; i < compacted; ++i)
      Codec::encode(store, h, where.slot(h, i), i, &keys(0, h, i, 0), &values(0, h, i, 0));
  }
  for (std::int64_t i = compacted; i < count; ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      Codec::encode(store, h, where.slot(h, i), i, &keys(0, h, i, 0), &values(0, h, i, 0));
}

/// Every held token decodes to the same bits through both storages.
template <class Codec>
void expect_same_decode(const typename Codec::template storage<kt::host_space>& reference, const placement& contiguous,
                        const typename Codec::template storage<kt::host_space>& tested, const placement& where,
                        std::int64_t count) {
  std::vector<float> want(dim), got(dim);
  for (std::int64_t h = 0; h < heads; ++h)
    for (std::int64_t i = 0; i < count; ++i) {
      Codec::load_key(reference, h, contiguous.slot(h, i), i, want.data());
      Codec::load_key(tested, h, where.slot(h, i), i, got.data());
      ASSERT_EQ(std::memcmp(want.data(), got.data(), sizeof(float) * dim), 0) << "key of head " << h << " token " << i;
      Codec::load_value(reference, h, contiguous.slot(h, i), want.data());
      Codec::load_value(tested, h, where.slot(h, i), got.data());
      ASSERT_EQ(std::memcmp(want.data(), got.data(), sizeof(float) * dim), 0)
          << "value of head " << h << " token " << i;
    }
}

template <class Codec>
void check_runs_decode_like_contiguous(const typename Codec::config& cfg) {
  constexpr std::int64_t capacity = 128, compacted = 40, total = 107;  // 3 groups sealed, 11 keys in fp16
  auto keys = random_tensor<float, 4>({1, heads, capacity, dim}, 201, 2.0f);
  auto values = random_tensor<float, 4>({1, heads, capacity, dim}, 202, 2.0f);
  for (std::int64_t d = 0; d < dim; ++d) keys(0, 1, 37, d) *= 12.0f;  // an outlier in group 1 of head 1
  const placement contiguous = placement::contiguous(capacity);
  bound<Codec> reference(cfg, contiguous.slots(), heads, dim, group);
  write_tokens<Codec>(reference.store, contiguous, keys, values, compacted, total);
  for (std::int64_t run : {1, 2, 16, 32}) {
    SCOPED_TRACE(::testing::Message() << "slot_run " << run);
    const placement where = placement::paged(std::max<std::int64_t>(16, run), capacity);
    bound<Codec> tested(cfg, where.slots(), heads, dim, run);
    EXPECT_EQ(tested.store.slot_run, run);
    EXPECT_EQ(tested.store.slots, where.slots());
    for (std::int64_t count : {std::int64_t{20}, compacted, std::int64_t{64}, std::int64_t{65}, total}) {
      // Writing in stages, comparing at each: filling and sealed groups alike.
      bound<Codec> staged(cfg, where.slots(), heads, dim, run);
      write_tokens<Codec>(staged.store, where, keys, values, std::min(compacted, count), count);
      bound<Codec> reference_staged(cfg, contiguous.slots(), heads, dim, group);
      write_tokens<Codec>(reference_staged.store, contiguous, keys, values, std::min(compacted, count), count);
      expect_same_decode<Codec>(reference_staged.store, contiguous, staged.store, where, count);
    }
    write_tokens<Codec>(tested.store, where, keys, values, compacted, total);
    expect_same_decode<Codec>(reference.store, contiguous, tested.store, where, total);
  }
}

}  // namespace

TEST(SlotRuns, Int8RunsOf1To32DecodeLikeOneContiguousRun) {
  check_runs_decode_like_contiguous<kt::codec::int8>({.key_group = group});
  check_runs_decode_like_contiguous<kt::codec::int8>({.key_group = group, .asymmetric = true});
}

TEST(SlotRuns, Int4RunsOf1To32DecodeLikeOneContiguousRun) {
  check_runs_decode_like_contiguous<kt::codec::int4>({.key_group = group});
  check_runs_decode_like_contiguous<kt::codec::int4>({.key_group = group, .asymmetric = true});
}

TEST(SlotRuns, LayeredInt8ForwardsItsAlignmentAndRun) {
  using layered = kt::codec::layered<kt::codec::int8>;
  EXPECT_EQ(kt::codec::slot_alignment<layered>({}), 32);
  EXPECT_EQ(kt::codec::slot_alignment<kt::codec::int8>({.key_group = 16}), 16);
  EXPECT_EQ(kt::codec::slot_alignment<kt::codec::int8>({.keys = kt::codec::key_scaling::per_token}), 1);
  EXPECT_EQ(kt::codec::slot_alignment<kt::codec::fp16>({}), 1);
  EXPECT_EQ(kt::codec::slot_alignment<kt::codec::low_rank>({}), 1);
  check_runs_decode_like_contiguous<layered>({.inner = {.key_group = group}, .recent = 8, .sinks = 2});
  bound<layered> paged({}, 64, 1, dim, 16);
  EXPECT_EQ(paged.store.slot_run, 16);
  EXPECT_EQ(paged.store.inner.slot_run, 16);
}

TEST(SlotRuns, ASealedGroupsScalesAreInEveryRunItCovers) {
  constexpr std::int64_t capacity = 64, run = 16;
  auto keys = random_tensor<float, 4>({1, heads, capacity, dim}, 211, 1.0f);
  const placement where = placement::paged(run, capacity);
  for (bool asymmetric : {false, true}) {
    bound<kt::codec::int8> codec({.key_group = group, .asymmetric = asymmetric}, where.slots(), heads, dim, run);
    write_tokens<kt::codec::int8>(codec.store, where, keys, keys, 0, 40);  // group 0 sealed, 8 of group 1
    for (std::int64_t h = 0; h < heads; ++h) {
      const std::int64_t first = where.pages[h][0], second = where.pages[h][1], third = where.pages[h][2];
      ASSERT_NE(second, first + 1);  // non-adjacent pages
      EXPECT_EQ(codec.store.run_sealed[first], 1);
      EXPECT_EQ(codec.store.run_sealed[second], 1);
      EXPECT_EQ(codec.store.run_sealed[third], 0);  // the filling group
      for (std::int64_t d = 0; d < dim; ++d) {
        EXPECT_GT(codec.store.key_scales[first * dim + d], 0.0f);
        EXPECT_EQ(codec.store.key_scales[first * dim + d], codec.store.key_scales[second * dim + d]);
        if (asymmetric) {
          EXPECT_EQ(codec.store.key_zeros[first * dim + d], codec.store.key_zeros[second * dim + d]);
        }
        EXPECT_EQ(kt::codec::int8::key_step(codec.store, where.slot(h, 0), d),
                  kt::codec::int8::key_step(codec.store, where.slot(h, 31), d));
      }
      EXPECT_EQ(kt::codec::int8::key_step(codec.store, where.slot(h, 33), 0), 0.0f);
    }
  }
}

TEST(SlotRuns, MoveSlotCarriesAlignedRunsSealedOrFilling) {
  constexpr std::int64_t capacity = 64, run = 16, total = 64, before_move = 50;
  auto keys = random_tensor<float, 4>({1, heads, total, dim}, 221, 1.0f);
  auto values = random_tensor<float, 4>({1, heads, total, dim}, 222, 1.0f);
  const placement contiguous = placement::contiguous(capacity);
  bound<kt::codec::int8> reference({}, contiguous.slots(), heads, dim, group);
  write_tokens<kt::codec::int8>(reference.store, contiguous, keys, values, 0, total);
  bound<kt::codec::int8> reference_before({}, contiguous.slots(), heads, dim, group);
  write_tokens<kt::codec::int8>(reference_before.store, contiguous, keys, values, 0, before_move);

  // Pages of 16 in a pool of twice the room; head 0's pages 1 (sealed, group 0)
  // and 3 (filling, group 1) move to free pages, as a repack would.
  placement where = placement::paged(run, capacity);
  const std::int64_t pool = 2 * where.slots();
  bound<kt::codec::int8> codec({}, pool, heads, dim, run);
  write_tokens<kt::codec::int8>(codec.store, where, keys, values, 0, before_move);
  for (std::int64_t moved_page : {1, 3}) {
    const std::int64_t from = where.pages[0][moved_page] * run;
    const std::int64_t target_page = where.slots() / run + moved_page;  // beyond every page in use
    for (std::int64_t i = 0; i < run; ++i) kt::codec::int8::move_slot(codec.store, 0, from + i, target_page * run + i);
    where.pages[0][moved_page] = target_page;
  }
  // Misaligned moves are refused: a run's scales cannot be split.
  EXPECT_THROW(kt::codec::int8::move_slot(codec.store, 0, where.slot(0, 0), where.slot(0, 0) + 1), kt::error);
  expect_same_decode<kt::codec::int8>(reference_before.store, contiguous, codec.store, where, before_move);
  // Head 0's filling group completes at its new place; the group seals there.
  for (std::int64_t i = before_move; i < total; ++i)
    for (std::int64_t h = 0; h < heads; ++h)
      kt::codec::int8::encode(codec.store, h, where.slot(h, i), i, &keys(0, h, i, 0), &values(0, h, i, 0));
  expect_same_decode<kt::codec::int8>(reference.store, contiguous, codec.store, where, total);
  EXPECT_EQ(codec.store.run_sealed[where.pages[0][3]], 1);
}

TEST(SlotRuns, RunRuleViolationsAndBadRunsAreRefused) {
  bound<kt::codec::int8> codec({}, 64, 2, 8, 16);
  const std::vector<float> row(8, 1.0f);
  kt::codec::int8::encode(codec.store, 0, 16, 0, row.data(), row.data());
  // Token 1 of head 0 must follow slot 16; slot 18 skips one, slot 33 starts a
  // run at an odd place.
  EXPECT_THROW(kt::codec::int8::encode(codec.store, 0, 18, 1, row.data(), row.data()), kt::error);
  EXPECT_THROW(kt::codec::int8::encode(codec.store, 1, 33, 0, row.data(), row.data()), kt::error);
  kt::codec::int8::encode(codec.store, 0, 17, 1, row.data(), row.data());
  EXPECT_THROW(kt::codec::int8::encode(codec.store, 0, 17, 2, row.data(), row.data()), kt::error);  // 18 is next
  // Storage: runs must divide key_group and the slots.
  EXPECT_THROW(kt::codec::int8::storage_bytes({}, 64, 2, 8, 24), kt::error);
  EXPECT_THROW(kt::codec::int8::storage_bytes({}, 72, 2, 8, 16), kt::error);
  EXPECT_NO_THROW(kt::codec::fp16::storage_bytes({}, 72, 2, 8, 16));  // no runs: U ignored
  EXPECT_THROW(kt::codec::fp16::storage_bytes({}, 72, 2, 8, 0), kt::error);
  // Per-token keys: no runs, slot by slot moves.
  bound<kt::codec::int8> per_token({.keys = kt::codec::key_scaling::per_token}, 40, 2, 8, 1);
  EXPECT_EQ(per_token.store.slot_run, 1);
  kt::codec::int8::encode(per_token.store, 0, 3, 0, row.data(), row.data());
  std::vector<float> before(8), after(8);
  kt::codec::int8::load_key(per_token.store, 0, 3, 0, before.data());
  kt::codec::int8::move_slot(per_token.store, 0, 3, 7);
  kt::codec::int8::load_key(per_token.store, 0, 7, 0, after.data());
  EXPECT_EQ(after, before);
}

TEST(SlotRuns, EveryStorageRecordsItsCapacity) {
  EXPECT_EQ((bound<kt::codec::fp16>({}, 40, 2, 8, 1).store.slots), 40);
  EXPECT_EQ((bound<kt::codec::fp8>({}, 40, 2, 8, 1).store.slots), 40);
  EXPECT_EQ((bound<kt::codec::low_rank>({.rank = 2}, 40, 2, 8, 1).store.slots), 40);
  EXPECT_EQ((bound<kt::codec::int4>({}, 64, 2, 8, 32).store.slots), 64);
  EXPECT_EQ((bound<kt::codec::layered<kt::codec::fp8>>({}, 40, 2, 8, 1).store.slots), 40);
}

// ---- positions are given, not counted ------------------------------------

TEST(Positions, PreRopeLowRankRotatesByThePositionItIsGiven) {
  constexpr std::int64_t tokens = 64, rank = 8, d = 32;
  const kt::rope rope{.theta = 10000.0, .rotary_dim = 0, .pairs = kt::rope::pairing::half_split};
  auto pre = structured_tensor({1, 1, tokens, d}, rank, 0.0, 231);  // exactly rank 8
  bound<kt::codec::low_rank> codec({.rank = rank, .update_freq = 0, .keys = kt::codec::key_space::pre_rope, .rope = rope},
                                   tokens, 1, d, 1);
  const auto rows = [&](std::int64_t i, float* key, float* value) {
    for (std::int64_t c = 0; c < d; ++c) key[c] = value[c] = pre(0, 0, i, c);
  };
  kt::codec::prepare_head<kt::codec::low_rank>(codec.store, 0, tokens, tokens, rows);
  // Token t is written at slot t with position 1000 + 3t (positions need not be
  // slots or indices).
  for (std::int64_t t = 0; t < tokens; ++t)
    kt::codec::low_rank::encode(codec.store, 0, t, 1000 + 3 * t, &pre(0, 0, t, 0), &pre(0, 0, t, 0));
  std::vector<float> loaded(d), expected(d), query(d);
  for (std::int64_t c = 0; c < d; ++c) query[c] = 0.1f * static_cast<float>(c % 7) - 0.3f;
  auto reader = kt::codec::attention_reader<kt::codec::low_rank>(codec.store, 0, query.data(), d);
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int64_t position = 1000 + 3 * t;
    double norm = 0.0;
    for (std::int64_t c = 0; c < d; ++c) {
      expected[c] = pre(0, 0, t, c);
      norm += static_cast<double>(expected[c]) * expected[c];
    }
    norm = std::sqrt(norm);
    rope.apply(expected.data(), d, position);
    kt::codec::low_rank::load_key(codec.store, 0, t, position, loaded.data());
    double error = 0.0, moved = 0.0, dot = 0.0;
    for (std::int64_t c = 0; c < d; ++c) {
      error = std::max(error, std::abs(static_cast<double>(loaded[c] - expected[c])));
      dot += static_cast<double>(query[c]) * loaded[c];
    }
    // Rank 8 data in a rank-8 basis: fp16 coefficients, then fp32 RoPE.
    EXPECT_LE(error, 4.0 * kt::element_traits<kt::half>::unit_roundoff * norm + 1e-5) << "token " << t;
    EXPECT_NEAR(reader.dot(t, position), dot, 1e-4 * (1.0 + std::abs(dot)));
    kt::codec::low_rank::load_key(codec.store, 0, t, position + 1, loaded.data());
    for (std::int64_t c = 0; c < d; ++c) moved = std::max(moved, std::abs(static_cast<double>(loaded[c] - expected[c])));
    EXPECT_GT(moved, 10.0 * error + 1e-3) << "token " << t;  // a different rotation
  }
  // Layered over it: the fp16 rows rotate by the given position too.
  using layered = kt::codec::layered<kt::codec::low_rank>;
  bound<layered> shadowed({.inner = {.rank = rank, .update_freq = 0, .keys = kt::codec::key_space::pre_rope, .rope = rope},
                           .recent = 4,
                           .sinks = 1},
                          tokens, 1, d, 1);
  kt::codec::prepare_head<layered>(shadowed.store, 0, tokens, tokens, rows);
  for (std::int64_t t = 0; t < tokens; ++t)
    layered::encode(shadowed.store, 0, t, 500 + t, &pre(0, 0, t, 0), &pre(0, 0, t, 0));
  for (std::int64_t t : {std::int64_t{0}, tokens - 1}) {
    ASSERT_TRUE(layered::in_fp16(shadowed.store, t));
    for (std::int64_t c = 0; c < d; ++c) expected[c] = static_cast<float>(kt::half(pre(0, 0, t, c)));
    rope.apply(expected.data(), d, 777);
    layered::load_key(shadowed.store, 0, t, 777, loaded.data());
    for (std::int64_t c = 0; c < d; ++c) EXPECT_FLOAT_EQ(loaded[c], expected[c]);
  }
}

// ---- layouts: paged with pages of 16 and the default int8 ------------------

namespace {

constexpr kt::model_shape pipeline_shape{.q_heads = 4, .kv_heads = 2, .head_dim = 32};
constexpr std::int64_t pipeline_batch = 2, prefill = 90, keep = 45;

kt::kv_view<const float> token_range(const host_tensor<float, 4>& x, std::int64_t begin, std::int64_t count) {
  kt::kv_view<const float> view = x.cview();
  view.data += begin * view.strides[2];
  view.extents[2] = count;
  return view;
}

/// Compress, append 1 then 20 tokens, attend; returns every held key, value and
/// the attention output, decoded, in logical order.
template <class Layout, class Codec>
std::vector<float> pipeline(const typename Codec::config& codec_config) {
  using scheme = kt::scheme<Layout, kt::score::static_window, kt::budget::uniform, Codec, kt::backend::cpu>;
  auto keys = structured_tensor({pipeline_batch, pipeline_shape.kv_heads, prefill + 21, pipeline_shape.head_dim}, 8,
                                0.05, 241);
  auto values = structured_tensor({pipeline_batch, pipeline_shape.kv_heads, prefill + 21, pipeline_shape.head_dim}, 8,
                                  0.05, 242);
  auto queries = random_tensor<float, 3>({pipeline_batch, pipeline_shape.q_heads, pipeline_shape.head_dim}, 243);
  typename scheme::config cfg;
  cfg.budget.keep = kt::keep_tokens{keep};
  cfg.score.sinks = 4;
  auto cache = [&] {
    if constexpr (std::is_same_v<Layout, kt::layout::paged>)
      return scheme::make_cache(pipeline_shape, pipeline_batch,
                                kt::layout::paged::pool_size{pipeline_batch * pipeline_shape.kv_heads * 5, 16},
                                codec_config);
    else
      return scheme::make_cache(pipeline_shape, pipeline_batch, 96, codec_config);
  }();
  std::vector<std::byte> scratch(scheme::compress_workspace(pipeline_shape, pipeline_batch, prefill, cfg));
  scheme::compress(token_range(keys, 0, prefill), token_range(values, 0, prefill), cache.view(), cfg,
                   {scratch.data(), scratch.size()});
  scheme::append(cache.view(), token_range(keys, prefill, 1), token_range(values, prefill, 1));
  scheme::append(cache.view(), token_range(keys, prefill + 1, 20), token_range(values, prefill + 1, 20));
  std::vector<float> result, row(pipeline_shape.head_dim);
  for (std::int64_t b = 0; b < pipeline_batch; ++b)
    for (std::int64_t h = 0; h < pipeline_shape.kv_heads; ++h) {
      EXPECT_EQ(cache.view().head_length(b, h), keep + 21);
      for (std::int64_t i = 0; i < cache.view().head_length(b, h); ++i) {
        const std::int64_t head = b * pipeline_shape.kv_heads + h, slot = cache.view().slot(b, h, i);
        Codec::load_key(cache.view().storage, head, slot, kt::codec::position_of(cache.view(), b, h, i), row.data());
        result.insert(result.end(), row.begin(), row.end());
        Codec::load_value(cache.view().storage, head, slot, row.data());
        result.insert(result.end(), row.begin(), row.end());
      }
    }
  auto out = make_tensor<float, 3>({pipeline_batch, pipeline_shape.q_heads, pipeline_shape.head_dim});
  scheme::attend(queries.cview(), cache.view(), out.view, {});
  result.insert(result.end(), out.storage.begin(), out.storage.end());
  return result;
}

}  // namespace

TEST(SlotRuns, PagedPagesOf16WithDefaultKiviGroupsMatchContiguous) {
  // Groups of 32 over pages of 16: bound with runs of 16, the same tokens decode
  // and attend to the same bits as in the contiguous layout.
  const auto paged = pipeline<kt::layout::paged, kt::codec::int8>({});
  const auto contiguous = pipeline<kt::layout::contiguous, kt::codec::int8>({});
  ASSERT_EQ(paged.size(), contiguous.size());
  EXPECT_EQ(std::memcmp(paged.data(), contiguous.data(), sizeof(float) * paged.size()), 0);
  const auto paged4 = pipeline<kt::layout::paged, kt::codec::int4>({.asymmetric = true});
  const auto contiguous4 = pipeline<kt::layout::contiguous, kt::codec::int4>({.asymmetric = true});
  EXPECT_EQ(std::memcmp(paged4.data(), contiguous4.data(), sizeof(float) * paged4.size()), 0);
  const auto layered = pipeline<kt::layout::paged, kt::codec::layered<kt::codec::int8>>({.recent = 8, .sinks = 4});
  const auto layered_contiguous =
      pipeline<kt::layout::contiguous, kt::codec::layered<kt::codec::int8>>({.recent = 8, .sinks = 4});
  EXPECT_EQ(std::memcmp(layered.data(), layered_contiguous.data(), sizeof(float) * layered.size()), 0);
}
