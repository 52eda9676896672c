// compress_options::sequence_lengths: a padded batch whose prompts have different
// lengths (an engine batching prefills of several requests), on backend::cpu.
//
// The oracle is the definition: sequence b of the batch must end up exactly as if
// its first T_b tokens had been compressed alone into a one-sequence cache of the
// same scheme — same kept tokens (the selection output, token for token), same
// positions, same compensation token, and decode attention over its heads equal
// bit for bit (the same rows in the same order through the same code). Padded
// tokens (t ≥ T_b) hold NaN in keys, values and H2O's queries: a read of any of
// them would be refused as non-finite or poison the outputs. Every scorer (SnapKV
// with and without given normalisers, H2O, key norm, static windows, RazorAttention,
// external scores) and budget (uniform, Ada-KV, pyramid, per-head) appears, over
// paged, flat, shared_paged and contiguous (which needs one kept count for all).
// Refusals name options.sequence_lengths and leave the cache as it was.
#include <gtest/gtest.h>

#include <kvtrim/backend/cpu/eviction.hpp>
#include <kvtrim/kvtrim.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/tensors.hpp"

namespace {

using namespace kvtrim;
using namespace kvtrim::testing;

constexpr float nan_value = std::numeric_limits<float>::quiet_NaN();

/// The batch's inputs: [B, H, T, D] keys and values with NaN past each T_b, window
/// queries [B, Hq, w, D] (H2O: [B, Hq, T, D], NaN past T_b), decode queries [B, Hq, D].
struct padded_batch {
  model_shape shape;
  std::vector<std::int64_t> lengths;
  std::int64_t tokens = 0, window = 0;
  host_tensor<float, 4> keys, values, queries;
  host_tensor<float, 4> new_keys, new_values;  // [B, H, 2, D]: two decode steps' tokens, appended after compress
  host_tensor<float, 3> decode_queries;

  padded_batch(model_shape shape_, std::vector<std::int64_t> lengths_, std::int64_t window_, bool every_query,
               std::uint64_t seed)
      : shape(shape_), lengths(std::move(lengths_)), window(window_) {
    tokens = *std::max_element(lengths.begin(), lengths.end());
    const std::int64_t batch = static_cast<std::int64_t>(lengths.size());
    keys = random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed);
    values = random_tensor<float, 4>({batch, shape.kv_heads, tokens, shape.head_dim}, seed + 1);
    const std::int64_t query_rows = every_query ? tokens : window;
    queries = random_tensor<float, 4>({batch, shape.q_heads, query_rows, shape.head_dim}, seed + 2);
    decode_queries = random_tensor<float, 3>({batch, shape.q_heads, shape.head_dim}, seed + 3);
    new_keys = random_tensor<float, 4>({batch, shape.kv_heads, 2, shape.head_dim}, seed + 4);
    new_values = random_tensor<float, 4>({batch, shape.kv_heads, 2, shape.head_dim}, seed + 5);
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t t = lengths[static_cast<std::size_t>(b)]; t < tokens; ++t)
        for (std::int64_t d = 0; d < shape.head_dim; ++d) {
          for (std::int64_t h = 0; h < shape.kv_heads; ++h) keys(b, h, t, d) = values(b, h, t, d) = nan_value;
          if (every_query)
            for (std::int64_t h = 0; h < shape.q_heads; ++h) queries(b, h, t, d) = nan_value;
        }
  }
  std::int64_t batch() const { return static_cast<std::int64_t>(lengths.size()); }
  std::int64_t length(std::int64_t b) const { return lengths[static_cast<std::size_t>(b)]; }

  /// Sequence b's own inputs, dense: [1, H, T_b, D] and its queries.
  host_tensor<float, 4> keys_of(std::int64_t b) const { return first(keys, b, length(b)); }
  host_tensor<float, 4> values_of(std::int64_t b) const { return first(values, b, length(b)); }
  host_tensor<float, 4> queries_of(std::int64_t b, bool every_query) const {
    return first(queries, b, every_query ? length(b) : window);
  }
  host_tensor<float, 4> new_keys_of(std::int64_t b) const { return first(new_keys, b, 2); }
  host_tensor<float, 4> new_values_of(std::int64_t b) const { return first(new_values, b, 2); }
  host_tensor<float, 3> decode_queries_of(std::int64_t b) const {
    auto out = make_tensor<float, 3>({1, shape.q_heads, shape.head_dim});
    for (std::int64_t h = 0; h < shape.q_heads; ++h)
      for (std::int64_t d = 0; d < shape.head_dim; ++d) out(0, h, d) = decode_queries(b, h, d);
    return out;
  }
  static host_tensor<float, 4> first(const host_tensor<float, 4>& from, std::int64_t b, std::int64_t count) {
    auto out = make_tensor<float, 4>({1, from.view.extent(1), count, from.view.extent(3)});
    for (std::int64_t h = 0; h < from.view.extent(1); ++h)
      for (std::int64_t t = 0; t < count; ++t)
        for (std::int64_t d = 0; d < from.view.extent(3); ++d) out(0, h, t, d) = from(b, h, t, d);
    return out;
  }
};

/// Sequence b's first `count` entries along the last axis of a [B, X, ·] tensor, dense [1, X, count].
host_tensor<float, 3> sequence_rows(const host_tensor<float, 3>& from, std::int64_t b, std::int64_t count) {
  auto out = make_tensor<float, 3>({1, from.view.extent(1), count});
  for (std::int64_t x = 0; x < from.view.extent(1); ++x)
    for (std::int64_t i = 0; i < count; ++i) out(0, x, i) = from(b, x, i);
  return out;
}

/// `sequence_rows` for every sequence, the first count(b) entries each.
template <class Count>
std::vector<host_tensor<float, 3>> rows_per_sequence(const host_tensor<float, 3>& from, Count&& count) {
  std::vector<host_tensor<float, 3>> rows;
  for (std::int64_t b = 0; b < from.view.extent(0); ++b) rows.push_back(sequence_rows(from, b, count(b)));
  return rows;
}

/// The config for sequence b alone of a scorer given each sequence's own normalisers.
auto with_own_normalisers(const std::vector<host_tensor<float, 3>>& own) {
  return [&own](auto cfg, std::int64_t b) {
    cfg.score = cfg.score.with_lse(own[static_cast<std::size_t>(b)].cview());
    return cfg;
  };
}

/// What a compress left: per head its kept tokens and positions, and the attention output;
/// then, after appending two tokens to every head, the positions and attention again.
struct outcome {
  std::vector<std::vector<std::int32_t>> kept;       // [B·H]
  std::vector<std::vector<std::int32_t>> positions;  // [B·H]
  std::vector<float> attention;                      // [B, Hq, D]
  std::vector<std::vector<std::int32_t>> appended_positions;
  std::vector<float> appended_attention;
};

template <class Scheme, class Cache>
outcome run(Cache& cache, const typename Scheme::config& cfg, const tensor_view<const float, 4>& keys,
            const tensor_view<const float, 4>& values, const tensor_view<const float, 4>& queries,
            const tensor_view<const float, 3>& decode_queries, const std::int64_t* lengths,
            const tensor_view<const float, 4>& new_keys = {}, const tensor_view<const float, 4>& new_values = {}) {
  const model_shape shape = cache.view().shape;
  const std::int64_t batch = keys.extent(0), tokens = keys.extent(2), heads = batch * shape.kv_heads;
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
  std::vector<std::int32_t> kept(static_cast<std::size_t>(Scheme::kept_tokens_capacity(shape, batch, tokens, cfg)));
  compress_options<host_space> options;
  options.kept_offsets = offsets.data();
  options.kept_tokens = kept.data();
  options.kept_tokens_capacity = static_cast<std::int64_t>(kept.size());
  options.start_position = 5;
  options.sequence_lengths = lengths;
  std::vector<std::byte> scratch(Scheme::compress_workspace(shape, batch, tokens, cfg));
  auto view = cache.view();
  if constexpr (Scheme::scorer::needs_queries)
    Scheme::compress(keys, values, queries, view, cfg, options, {scratch.data(), scratch.size()});
  else
    Scheme::compress(keys, values, view, cfg, options, {scratch.data(), scratch.size()});
  outcome result;
  for (std::int64_t head = 0; head < heads; ++head) {
    result.kept.emplace_back(kept.begin() + offsets[static_cast<std::size_t>(head)],
                             kept.begin() + offsets[static_cast<std::size_t>(head) + 1]);
    result.positions.push_back(head_positions(view, head / shape.kv_heads, head % shape.kv_heads));
  }
  const auto attend = [&](std::vector<float>& attention) {
    std::vector<std::byte> attend_scratch(Scheme::attend_workspace(view));
    attention.assign(static_cast<std::size_t>(batch * shape.q_heads * shape.head_dim), 0.0f);
    const auto out = make_view(attention.data(), std::array<std::int64_t, 3>{batch, shape.q_heads, shape.head_dim});
    Scheme::attend(decode_queries, view, out, {attend_scratch.data(), attend_scratch.size()});
  };
  attend(result.attention);
  if (new_keys.data != nullptr) {
    Scheme::append(view, new_keys, new_values);
    for (std::int64_t head = 0; head < heads; ++head)
      result.appended_positions.push_back(head_positions(view, head / shape.kv_heads, head % shape.kv_heads));
    attend(result.appended_attention);
  }
  return result;
}

/// Compresses the padded batch with its lengths and each sequence alone; they must agree.
/// `make(batch)` makes an empty cache; `sequence_config(cfg, b)` the config for sequence b
/// alone (per-sequence inputs the config holds, sliced by the test itself).
template <class Scheme, class Make, class SequenceConfig>
void expect_each_sequence_as_if_alone(const padded_batch& in, const typename Scheme::config& cfg, Make&& make,
                                      SequenceConfig&& sequence_config) {
  constexpr bool every_query = requires { requires Scheme::scorer::observes_every_query; };
  const model_shape shape = in.shape;
  auto cache = make(in.batch());
  const outcome together = run<Scheme>(cache, cfg, in.keys.cview(), in.values.cview(), in.queries.cview(),
                                       in.decode_queries.cview(), in.lengths.data(), in.new_keys.cview(),
                                       in.new_values.cview());
  for (std::int64_t b = 0; b < in.batch(); ++b) {
    SCOPED_TRACE("sequence " + std::to_string(b) + " of " + std::to_string(in.length(b)) + " tokens");
    const auto keys = in.keys_of(b), values = in.values_of(b), queries = in.queries_of(b, every_query);
    const auto decode = in.decode_queries_of(b);
    const auto new_keys = in.new_keys_of(b), new_values = in.new_values_of(b);
    auto single = make(1);
    const outcome alone = run<Scheme>(single, sequence_config(cfg, b), keys.cview(), values.cview(), queries.cview(),
                                      decode.cview(), nullptr, new_keys.cview(), new_values.cview());
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
      const auto head = static_cast<std::size_t>(b * shape.kv_heads + h);
      EXPECT_EQ(together.kept[head], alone.kept[static_cast<std::size_t>(h)]) << "kept tokens of kv head " << h;
      EXPECT_EQ(together.positions[head], alone.positions[static_cast<std::size_t>(h)]) << "positions of kv head " << h;
      EXPECT_EQ(together.appended_positions[head], alone.appended_positions[static_cast<std::size_t>(h)])
          << "positions of kv head " << h << " after two appends (they continue from start + T_b)";
    }
    const std::size_t row = static_cast<std::size_t>(shape.q_heads * shape.head_dim);
    for (const auto& [got, want, when] : {std::tuple{&together.attention, &alone.attention, "after compress"},
                                          std::tuple{&together.appended_attention, &alone.appended_attention,
                                                     "after two appends"}})
      for (std::size_t i = 0; i < row; ++i) {
        const float a = (*got)[static_cast<std::size_t>(b) * row + i], e = (*want)[i];
        ASSERT_TRUE(std::isfinite(a)) << when << ", output " << i << " (a padded token was read)";
        EXPECT_EQ(std::memcmp(&a, &e, sizeof a), 0) << when << ", output " << i << ": " << a << " vs " << e << " alone";
      }
  }
}

const auto same_config = [](const auto& cfg, std::int64_t) { return cfg; };

const model_shape shape{.q_heads = 8, .kv_heads = 2, .head_dim = 16};
const std::vector<std::int64_t> prompt_lengths{61, 17, 93, 40};

template <class Scheme>
auto paged_maker(std::int64_t page = 8) {
  return [page](std::int64_t batch) {
    return Scheme::make_cache(shape, batch, layout::paged::pool_size{batch * shape.kv_heads * 20, page},
                              typename Scheme::codec::config{});
  };
}
template <class Scheme>
auto flat_maker() {
  return [](std::int64_t batch) {
    return Scheme::make_cache(shape, batch, layout::flat::pool_size{batch * shape.kv_heads * 160},
                              typename Scheme::codec::config{});
  };
}

TEST(SequenceLengths, SnapKVWithAdaKVOnPagedAsIfEachSequenceWereAlone) {
  using scheme = kvtrim::scheme<layout::paged, score::snapkv, budget::adaptive, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 4, false, 10);
  scheme::config cfg;
  cfg.score.window = 4;
  cfg.budget.keep = keep_ratio{0.4};  // 6 of sequence 1's 17 tokens a head: above its 4 protected
  expect_each_sequence_as_if_alone<scheme>(in, cfg, paged_maker<scheme>(), same_config);
}

TEST(SequenceLengths, SnapKVWithTheirOwnNormalisersOnFlat) {
  using scheme = kvtrim::scheme<layout::flat, score::snapkv, budget::uniform, codec::int8, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 6, false, 20);
  // Normalisers [B, Hq, w], strided; each sequence's rows are its own (made up: any finite values rank).
  auto lse = random_tensor<float, 3>({in.batch(), shape.q_heads, 6}, 21, 1.0f, {0, 1, 2});
  scheme::config cfg;
  cfg.score.window = 6;
  cfg.score = cfg.score.with_lse(lse.cview());
  cfg.budget.keep = keep_ratio{0.3};
  const auto own = rows_per_sequence(lse, [](std::int64_t) { return std::int64_t{6}; });
  expect_each_sequence_as_if_alone<scheme>(in, cfg, flat_maker<scheme>(), with_own_normalisers(own));
}

TEST(SequenceLengths, H2OObservesEachSequencesOwnQueries) {
  using scheme = kvtrim::scheme<layout::paged, score::h2o, budget::pyramid, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, true, 30);
  scheme::config cfg;
  cfg.budget.keep = keep_ratio{0.5};
  cfg.budget.layer = 2;
  cfg.budget.layers = 6;
  expect_each_sequence_as_if_alone<scheme>(in, cfg, paged_maker<scheme>(16), same_config);
}

TEST(SequenceLengths, ObservedAttentionWithGivenNormalisersOfEveryQuery) {
  using scheme = kvtrim::scheme<layout::flat, score::h2o, budget::adaptive, codec::fp32, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, true, 40);
  auto lse = random_tensor<float, 3>({in.batch(), shape.q_heads, in.tokens}, 41, 2.0f);
  for (std::int64_t b = 0; b < in.batch(); ++b)
    for (std::int64_t h = 0; h < shape.q_heads; ++h)
      for (std::int64_t t = in.length(b); t < in.tokens; ++t) lse(b, h, t) = nan_value;  // padding: never read
  scheme::config cfg;
  cfg.score.normalisation = score::h2o::normalisation::observed;
  cfg.score.protect_recent = false;
  cfg.score = cfg.score.with_lse(lse.cview());
  cfg.budget.keep = keep_ratio{0.25};
  const auto own = rows_per_sequence(lse, [&](std::int64_t b) { return in.length(b); });
  expect_each_sequence_as_if_alone<scheme>(in, cfg, flat_maker<scheme>(), with_own_normalisers(own));
}

TEST(SequenceLengths, KeyNormAndStaticWindowsWithPerHeadBudgets) {
  {
    using scheme = kvtrim::scheme<layout::paged, score::key_norm, budget::per_head, codec::int4, backend::cpu>;
    const padded_batch in(shape, prompt_lengths, 0, false, 50);
    scheme::config cfg;
    cfg.budget.lengths = {9, 30};  // sequence 1 (17 tokens) keeps all of them in head 1
    cfg.budget.kv_heads = shape.kv_heads;
    expect_each_sequence_as_if_alone<scheme>(in, cfg, paged_maker<scheme>(32), same_config);
  }
  {
    using scheme = kvtrim::scheme<layout::flat, score::static_window, budget::uniform, codec::bf16, backend::cpu>;
    const padded_batch in(shape, prompt_lengths, 0, false, 60);
    scheme::config cfg;
    cfg.score.sinks = 3;
    cfg.score.windows = {5, 12};
    cfg.budget.keep = keep_ratio{0.5};
    expect_each_sequence_as_if_alone<scheme>(in, cfg, flat_maker<scheme>(), same_config);
  }
}

TEST(SequenceLengths, RazorAttentionCompensatesFromEachSequencesOwnDroppedTokens) {
  using scheme = kvtrim::scheme<layout::paged, score::retrieval_head, budget::by_scorer, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, false, 70);
  scheme::config cfg;
  cfg.score.retrieval = {false, true};
  cfg.score.sinks = 2;
  cfg.score.min_recent = 6;
  cfg.score.recent_fraction = 0.1;
  expect_each_sequence_as_if_alone<scheme>(in, cfg, paged_maker<scheme>(), same_config);
}

TEST(SequenceLengths, ExternalScoresAreReadAtEachSequencesRows) {
  using scheme = kvtrim::scheme<layout::shared_paged, score::external, budget::uniform, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, false, 80);
  auto given = random_tensor<float, 3>({in.batch(), shape.kv_heads, in.tokens}, 81, 1.0f, {0, 0, 3});
  for (std::int64_t b = 0; b < in.batch(); ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      for (std::int64_t t = in.length(b); t < in.tokens; ++t) given(b, h, t) = 1e30f;  // padding ranks first if read
  scheme::config cfg;
  cfg.score = score::external::config::from(given.cview());
  cfg.budget.keep = keep_ratio{0.35};
  const auto own = rows_per_sequence(given, [&](std::int64_t b) { return in.length(b); });
  const auto make = [](std::int64_t batch) {
    return scheme::make_cache(shape, batch, layout::shared_paged::pool_size{batch * 16, 4, layout::shared_paged::order::hnd},
                              codec::fp16::config{});
  };
  expect_each_sequence_as_if_alone<scheme>(in, cfg, make, [&](scheme::config c, std::int64_t b) {
    c.score = score::external::config::from(own[static_cast<std::size_t>(b)].cview());
    return c;
  });
}

TEST(SequenceLengths, StatefulCodecsAsIfEachSequenceWereAlone) {
  // Codecs whose per-head state is fitted at compaction: layered<int8>'s fp16 sinks and recent
  // ring, fp8's head amax scales, low_rank's sequence bases (refreshed every 2 appends).
  {
    using scheme = kvtrim::scheme<layout::flat, score::snapkv, budget::adaptive, codec::layered<codec::int8>, backend::cpu>;
    const padded_batch in(shape, prompt_lengths, 4, false, 200);
    scheme::config cfg;
    cfg.score.window = 4;
    cfg.budget.keep = keep_ratio{0.5};
    scheme::codec::config codec_cfg;
    codec_cfg.recent = 5;
    codec_cfg.sinks = 2;
    expect_each_sequence_as_if_alone<scheme>(in, cfg, [&](std::int64_t batch) {
      return scheme::make_cache(shape, batch, layout::flat::pool_size{batch * shape.kv_heads * 160}, codec_cfg);
    }, same_config);
  }
  {
    using scheme = kvtrim::scheme<layout::paged, score::key_norm, budget::uniform, codec::fp8, backend::cpu>;
    const padded_batch in(shape, prompt_lengths, 0, false, 210);
    scheme::config cfg;
    cfg.budget.keep = keep_ratio{0.6};
    expect_each_sequence_as_if_alone<scheme>(in, cfg, paged_maker<scheme>(), same_config);
  }
  {
    using scheme = kvtrim::scheme<layout::paged, score::snapkv, budget::uniform, codec::low_rank, backend::cpu>;
    const padded_batch in(shape, prompt_lengths, 4, false, 220);
    scheme::config cfg;
    cfg.score.window = 4;
    cfg.budget.keep = keep_ratio{0.6};
    scheme::codec::config codec_cfg;
    codec_cfg.update_freq = 2;
    expect_each_sequence_as_if_alone<scheme>(in, cfg, [&](std::int64_t batch) {
      return scheme::make_cache(shape, batch, layout::paged::pool_size{batch * shape.kv_heads * 20, 8}, codec_cfg);
    }, same_config);
  }
}

TEST(SequenceLengths, NonFiniteExternalScoresOnRealTokensStillRankAheadOfThePadding) {
  // NaN (ranked as −∞), ±∞ on real tokens and +∞ in the padding: the padding scores NaN in the
  // batch's selection whatever it held, and every real token ranks ahead of it (ties: lower index).
  using scheme = kvtrim::scheme<layout::paged, score::external, budget::adaptive, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, false, 230);
  auto given = random_tensor<float, 3>({in.batch(), shape.kv_heads, in.tokens}, 231, 1.0f);
  for (std::int64_t b = 0; b < in.batch(); ++b)
    for (std::int64_t h = 0; h < shape.kv_heads; ++h)
      for (std::int64_t t = 0; t < in.tokens; ++t) {
        if (t >= in.length(b)) given(b, h, t) = std::numeric_limits<float>::infinity();
        else if (t % 3 == 0) given(b, h, t) = nan_value;
        else if (t % 5 == 1) given(b, h, t) = -std::numeric_limits<float>::infinity();
        else if (t % 7 == 2) given(b, h, t) = std::numeric_limits<float>::infinity();
      }
  scheme::config cfg;
  cfg.score = score::external::config::from(given.cview());
  cfg.budget.keep = keep_ratio{0.9};
  cfg.budget.kvpress_compatible = true;
  const auto own = rows_per_sequence(given, [&](std::int64_t b) { return in.length(b); });
  expect_each_sequence_as_if_alone<scheme>(in, cfg, paged_maker<scheme>(32), [&](scheme::config c, std::int64_t b) {
    c.score = score::external::config::from(own[static_cast<std::size_t>(b)].cview());
    return c;
  });
}

TEST(SequenceLengths, ContiguousTakesLengthsThatKeepEquallyMany) {
  using scheme = kvtrim::scheme<layout::contiguous, score::snapkv, budget::uniform, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 4, false, 90);
  scheme::config cfg;
  cfg.score.window = 4;
  cfg.budget.keep = keep_tokens{12};  // ≤ every T_b: every head keeps 12
  expect_each_sequence_as_if_alone<scheme>(
      in, cfg, [](std::int64_t batch) { return scheme::make_cache(shape, batch, 16, codec::fp16::config{}); },
      same_config);
}

/// The decode-time eviction metric seeded from a padded batch (its window queries at the end of each
/// prompt) equals each sequence's seed alone, slot for slot (the same arithmetic: bit for bit).
TEST(SequenceLengths, EvictionSeedReadsEachSequencesOwnPrompt) {
  using scheme = kvtrim::scheme<layout::paged, score::snapkv, budget::adaptive, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 4, false, 130);
  scheme::config cfg;
  cfg.score.window = 4;
  cfg.budget.keep = keep_ratio{0.5};
  // The metric of one cache after a compress with the kept output: [slots], and the cache's view.
  const auto seeded = [&](auto& cache, const tensor_view<const float, 4>& keys, const tensor_view<const float, 4>& values,
                          const tensor_view<const float, 4>& queries, const std::int64_t* lengths) {
    auto view = cache.view();
    const std::int64_t batch = keys.extent(0), heads = batch * shape.kv_heads;
    std::vector<std::int64_t> offsets(static_cast<std::size_t>(heads + 1));
    std::vector<std::int32_t> kept(
        static_cast<std::size_t>(scheme::kept_tokens_capacity(shape, batch, keys.extent(2), cfg)));
    compress_options<host_space> options;
    options.kept_offsets = offsets.data();
    options.kept_tokens = kept.data();
    options.kept_tokens_capacity = static_cast<std::int64_t>(kept.size());
    options.sequence_lengths = lengths;
    std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, keys.extent(2), cfg));
    scheme::compress(keys, values, queries, view, cfg, options, {scratch.data(), scratch.size()});
    const std::int64_t slots = kvtrim::detail::storage_slots(view.storage);
    std::vector<float> metric(static_cast<std::size_t>(slots), -1.0f);
    const eviction::metric_output<> output{metric.data(), slots, eviction::metric_kind::squared_sum, 2};
    eviction::seed_metric(keys, queries, view, {offsets.data(), kept.data(), heads}, 0, output, lengths);
    return metric;
  };
  auto together = paged_maker<scheme>()(in.batch());
  const auto metric = seeded(together, in.keys.cview(), in.values.cview(), in.queries.cview(), in.lengths.data());
  for (std::int64_t b = 0; b < in.batch(); ++b) {
    const auto keys = in.keys_of(b), values = in.values_of(b), queries = in.queries_of(b, false);
    auto alone = paged_maker<scheme>()(1);
    const auto own = seeded(alone, keys.cview(), values.cview(), queries.cview(), nullptr);
    for (std::int64_t h = 0; h < shape.kv_heads; ++h) {
      ASSERT_EQ(together.view().head_length(b, h), alone.view().head_length(0, h));
      for (std::int64_t i = 0; i < alone.view().head_length(0, h); ++i) {
        const float got = metric[static_cast<std::size_t>(together.view().slot(b, h, i))];
        const float want = own[static_cast<std::size_t>(alone.view().slot(0, h, i))];
        ASSERT_TRUE(std::isfinite(got)) << "sequence " << b << ", head " << h << ", token " << i;
        EXPECT_EQ(std::memcmp(&got, &want, sizeof got), 0)
            << "sequence " << b << ", head " << h << ", token " << i << ": " << got << " vs " << want << " alone";
      }
    }
  }
}

/// A refused call names `argument` and leaves every byte of the cache as it was.
template <class Scheme, class Cache>
void expect_refused_intact(Cache& cache, const typename Scheme::config& cfg, const padded_batch& in,
                           const std::vector<std::int64_t>& lengths, const std::string& argument,
                           const std::string& got) {
  const auto bytes = [&] {
    const auto* first = reinterpret_cast<const unsigned char*>(cache.data());
    return std::vector<unsigned char>(first, first + cache.bytes());
  };
  const auto before = bytes();
  compress_options<host_space> options;
  options.sequence_lengths = lengths.data();
  std::vector<std::byte> scratch(Scheme::compress_workspace(in.shape, in.batch(), in.tokens, cfg));
  auto view = cache.view();
  try {
    Scheme::compress(in.keys.cview(), in.values.cview(), in.queries.cview(), view, cfg, options,
                     {scratch.data(), scratch.size()});
    ADD_FAILURE() << "expected kvtrim::error naming " << argument;
  } catch (const kvtrim::error& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(argument), std::string::npos) << what;
    EXPECT_NE(what.find(got), std::string::npos) << what;
  }
  EXPECT_EQ(bytes(), before) << "a refused compress changed the cache";
}

TEST(SequenceLengths, BadLengthsAreRefusedBeforeAnyWrite) {
  using scheme = kvtrim::scheme<layout::paged, score::snapkv, budget::uniform, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 8, false, 100);
  scheme::config cfg;
  cfg.score.window = 8;
  cfg.budget.keep = keep_ratio{0.5};
  auto cache = paged_maker<scheme>()(in.batch());
  // A first compress, so that "as it was" is a cache holding tokens.
  run<scheme>(cache, cfg, in.keys.cview(), in.values.cview(), in.queries.cview(), in.decode_queries.cview(),
              in.lengths.data());
  expect_refused_intact<scheme>(cache, cfg, in, {61, 0, 93, 40}, "options.sequence_lengths", "0 for sequence 1");
  expect_refused_intact<scheme>(cache, cfg, in, {61, 17, 94, 40}, "options.sequence_lengths", "94 for sequence 2");
  expect_refused_intact<scheme>(cache, cfg, in, {61, 7, 93, 40}, "options.sequence_lengths", "7 for sequence 1");
  // A NaN inside a prompt (not in its padding) is still refused, naming where it is.
  padded_batch poisoned = in;
  poisoned.keys(3, 1, 39, 2) = nan_value;
  auto cache2 = paged_maker<scheme>()(in.batch());
  expect_refused_intact<scheme>(cache2, cfg, poisoned, in.lengths, "keys", "sequence 3, kv head 1, token 39");
}

TEST(SequenceLengths, H2OQueriesShortOfThePaddedBatchAreRefused) {
  // H2O reads each prompt's first T_b queries: fewer than T would be read past their end.
  using scheme = kvtrim::scheme<layout::paged, score::h2o, budget::uniform, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, true, 140);
  scheme::config cfg;
  cfg.budget.keep = keep_ratio{0.5};
  padded_batch short_queries = in;
  auto batch_short = make_tensor<float, 4>({in.batch(), shape.q_heads, in.tokens - 1, shape.head_dim});
  for (std::int64_t b = 0; b < in.batch(); ++b)
    for (std::int64_t h = 0; h < shape.q_heads; ++h)
      for (std::int64_t t = 0; t + 1 < in.tokens; ++t)
        for (std::int64_t d = 0; d < shape.head_dim; ++d) batch_short(b, h, t, d) = in.queries(b, h, t, d);
  short_queries.queries = std::move(batch_short);
  auto cache = paged_maker<scheme>()(in.batch());
  expect_refused_intact<scheme>(cache, cfg, short_queries, in.lengths, "window_queries", "all 93 prefill queries");
}

TEST(SequenceLengths, BudgetsKeepingMoreOfAShorterPromptAreRefused) {
  // PyramidKV's deep layers keep more of a short prompt than of a long one (the schedule's minimum
  // 2B − M shrinks as T grows): keep_tokens 10, β 2, layer 1 of 2 keeps 8 of 12 tokens but 5 of 40.
  // The selection's buffers hold what T keeps (kept_tokens_capacity, the workspace): refused.
  using scheme = kvtrim::scheme<layout::paged, score::key_norm, budget::pyramid, codec::fp16, backend::cpu>;
  const padded_batch in(shape, {12, 40}, 0, false, 150);
  scheme::config cfg;
  cfg.budget.keep = keep_tokens{10};
  cfg.budget.beta = 2;
  cfg.budget.layer = 1;
  cfg.budget.layers = 2;
  ASSERT_GT(budget::pyramid::max_keep(cfg.budget, 12), budget::pyramid::max_keep(cfg.budget, 40));
  auto cache = paged_maker<scheme>()(in.batch());
  expect_refused_intact<scheme>(cache, cfg, in, in.lengths, "options.sequence_lengths", "for sequence 0 (12 tokens)");
}

TEST(SequenceLengths, APolicysRefusalNamesTheSequence) {
  // Pyramid's window must fit each sequence's own per-head budget: sequence 1 (17 tokens) cannot
  // hold it; the error says which sequence, and nothing was written.
  using scheme = kvtrim::scheme<layout::paged, score::key_norm, budget::pyramid, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 0, false, 160);
  scheme::config cfg;
  cfg.budget.keep = keep_ratio{0.3};
  cfg.budget.window = 8;
  auto cache = paged_maker<scheme>()(in.batch());
  run<scheme>(cache, [&] {
    auto ok = cfg;
    ok.budget.window = 2;
    return ok;
  }(), in.keys.cview(), in.values.cview(), {}, in.decode_queries.cview(), in.lengths.data());
  expect_refused_intact<scheme>(cache, cfg, in, in.lengths, "config.budget.window", "(sequence 1 of the padded batch");
  // Ada-KV's paper form refuses a head whose protected tokens (SnapKV's window of 4) exceed its
  // budget: 20 % of sequence 1's 17 tokens is 3 — found while scoring, inside the per-sequence pass.
  using adaptive_scheme = kvtrim::scheme<layout::paged, score::snapkv, budget::adaptive, codec::fp16, backend::cpu>;
  const padded_batch windowed(shape, prompt_lengths, 4, false, 161);
  adaptive_scheme::config adaptive;
  adaptive.score.window = 4;
  adaptive.budget.keep = keep_ratio{0.2};
  auto adaptive_cache = paged_maker<adaptive_scheme>()(windowed.batch());
  expect_refused_intact<adaptive_scheme>(adaptive_cache, adaptive, windowed, windowed.lengths, "config.budget.keep",
                                         "(sequence 1 of the padded batch: its 17 tokens alone)");
}

TEST(SequenceLengths, ContiguousRefusesLengthsThatKeepDifferentCounts) {
  using scheme = kvtrim::scheme<layout::contiguous, score::snapkv, budget::uniform, codec::fp16, backend::cpu>;
  const padded_batch in(shape, prompt_lengths, 4, false, 110);
  scheme::config cfg;
  cfg.score.window = 4;
  cfg.budget.keep = keep_ratio{0.5};  // 30 of 61 but 8 of 17
  auto cache = scheme::make_cache(shape, in.batch(), 48, codec::fp16::config{});
  expect_refused_intact<scheme>(cache, cfg, in, in.lengths, "options.sequence_lengths", "8 for sequence 1");
}

TEST(SequenceLengths, AllEqualLengthsGiveTheUnpaddedCompress) {
  // Lengths all T: the same call as without them, bit for bit.
  using scheme = kvtrim::scheme<layout::flat, score::snapkv, budget::adaptive, codec::fp16, backend::cpu>;
  const padded_batch in(shape, {33, 33, 33}, 5, false, 120);
  scheme::config cfg;
  cfg.score.window = 5;
  cfg.budget.keep = keep_ratio{0.3};
  auto with = flat_maker<scheme>()(3);
  auto without = flat_maker<scheme>()(3);
  const outcome a = run<scheme>(with, cfg, in.keys.cview(), in.values.cview(), in.queries.cview(),
                                in.decode_queries.cview(), in.lengths.data());
  const outcome b = run<scheme>(without, cfg, in.keys.cview(), in.values.cview(), in.queries.cview(),
                                in.decode_queries.cview(), nullptr);
  EXPECT_EQ(a.kept, b.kept);
  EXPECT_EQ(a.positions, b.positions);
  EXPECT_EQ(std::memcmp(a.attention.data(), b.attention.data(), a.attention.size() * sizeof(float)), 0);
}

}  // namespace
