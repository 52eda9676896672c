// io::profile: save/load round trips, and every malformed or mismatched file
// is a kvtrim::error that names the offending JSON path; a loaded profile's
// budgets and windows become budget::per_head / score::static_window configs.
#include <gtest/gtest.h>

#include <kvtrim/io/profile.hpp>
#include <kvtrim/kvtrim.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/oracle.hpp"
#include "common/tensors.hpp"
#include "common/token_sets.hpp"

namespace kt = kvtrim;
using nlohmann::json;

namespace {

kt::io::profile sample_profile() {
  auto data = kt::io::profile::for_model(
      {.layers = 2, .shape = {.q_heads = 8, .kv_heads = 4, .head_dim = 64}, .encoding = kt::io::positions::rope});
  data.layers[0].retrieval = {true, false, false, true};
  data.layers[0].echo = {0.125, 1.0 / 3.0, 0.0, 0.7};
  data.layers[0].induction = {0.5, 0.1, 1e-17, 0.3};
  data.layers[1].retrieval = {false, false, false, false};
  data.layers[1].windows = {4096, 512, 128, 100000};
  data.layers[1].budgets = {1, 2, 3, 4};
  data.layers[1].key_basis = "bases.safetensors#layer1.keys";
  data.layers[1].value_basis = "bases.safetensors#layer1.values";
  data.razor = kt::io::razor_calibration{{.block = 2500, .repeats = 4, .seed = 18446744073709551615ull}, {}};
  return data;
}

std::filesystem::path temp_path(const std::string& name) {
  return std::filesystem::temp_directory_path() / ("kvtrim_profile_test_" + name + ".json");
}

/// Expects from_json(j) to throw kvtrim::error whose message contains every `parts`.
template <class... Parts>
void expect_rejected(const json& j, const Parts&... parts) {
  try {
    kt::io::from_json(j);
    ADD_FAILURE() << "accepted: " << j.dump();
  } catch (const kt::error& failure) {
    const std::string message = failure.what();
    for (const std::string& part : {std::string(parts)...})
      EXPECT_NE(message.find(part), std::string::npos) << "message '" << message << "' lacks '" << part << "'";
  }
}

}  // namespace

TEST(Profile, RoundTripThroughAFile) {
  const auto data = sample_profile();
  const auto path = temp_path("round_trip");
  kt::io::save_profile(data, path);
  const auto loaded = kt::io::load_profile(path, data.model);
  EXPECT_EQ(loaded, data);  // doubles included: nlohmann writes the shortest round-tripping form
  EXPECT_EQ(kt::io::load_profile(path), data);
  std::filesystem::remove(path);
}

TEST(Profile, FileFormatIsTheDocumentedOne) {
  const json j = kt::io::to_json(sample_profile());
  EXPECT_EQ(j.at("format"), "kvtrim.profile");
  EXPECT_EQ(j.at("version"), 1);
  EXPECT_EQ(j.at("model"), json::parse(R"({"layers": 2, "q_heads": 8, "kv_heads": 4, "head_dim": 64,
                                           "positions": "rope"})"));
  EXPECT_EQ(j.at("layers")[0].at("retrieval_heads"), json::parse("[0, 3]"));
  EXPECT_EQ(j.at("layers")[1].at("retrieval_heads"), json::array());
  EXPECT_EQ(j.at("layers")[1].at("bases").at("keys"), "bases.safetensors#layer1.keys");
  EXPECT_EQ(j.at("calibration").at("method"), "razor_attention");
  EXPECT_EQ(j.at("calibration").at("induction_fraction"), 0.14);
  EXPECT_FALSE(j.at("layers")[0].contains("windows"));
}

TEST(Profile, RetrievalConfigForALayer) {
  const auto data = sample_profile();
  const auto cfg = data.retrieval_config(0);
  EXPECT_EQ(cfg.retrieval, (std::vector<bool>{true, false, false, true}));
  EXPECT_EQ(cfg.sinks, 4);
  EXPECT_THROW(data.retrieval_config(2), kt::error);
  auto without = kt::io::profile::for_model(data.model);
  EXPECT_THROW(without.retrieval_config(0), kt::error);
}

TEST(Profile, SignatureMismatchNamesTheField) {
  const auto path = temp_path("signature");
  kt::io::save_profile(sample_profile(), path);
  auto expect = sample_profile().model;
  const auto mismatch = [&](auto change, const std::string& field) {
    auto model = expect;
    change(model);
    try {
      kt::io::load_profile(path, model);
      ADD_FAILURE() << field << " mismatch accepted";
    } catch (const kt::error& failure) {
      EXPECT_NE(std::string(failure.what()).find(field), std::string::npos) << failure.what();
    }
  };
  mismatch([](auto& m) { m.layers = 3; }, "model.layers");
  mismatch([](auto& m) { m.shape.q_heads = 16; }, "model.q_heads");
  mismatch([](auto& m) { m.shape.kv_heads = 8; m.shape.q_heads = 8; }, "model.kv_heads");
  mismatch([](auto& m) { m.shape.head_dim = 128; }, "model.head_dim");
  mismatch([](auto& m) { m.encoding = kt::io::positions::alibi; }, "model.positions");
  std::filesystem::remove(path);
}

TEST(Profile, MalformedFilesAreRejectedWithThePath) {
  const json good = kt::io::to_json(sample_profile());
  EXPECT_NO_THROW(kt::io::from_json(good));
  const auto with = [&](const json::json_pointer& at, const json& value) {
    json j = good;
    j[at] = value;
    return j;
  };
  const auto without = [&](const json::json_pointer& at) {
    json j = good;
    j[at.parent_pointer()].erase(at.back());
    return j;
  };
  expect_rejected(with("/format"_json_pointer, "kvcache"), "format", "kvtrim.profile");
  expect_rejected(with("/version"_json_pointer, 2), "version", "format version 1", "version 2");
  expect_rejected(with("/version"_json_pointer, "1"), "version", "an integer");
  expect_rejected(without("/version"_json_pointer), "version", "missing");
  expect_rejected(without("/model/head_dim"_json_pointer), "model.head_dim", "missing");
  expect_rejected(with("/model/kv_heads"_json_pointer, 3), "shape.q_heads");  // 8 q heads over 3 kv heads
  expect_rejected(with("/model/kv_heads"_json_pointer, -4), "model.kv_heads");
  expect_rejected(with("/model/positions"_json_pointer, "sinusoidal"), "model.positions", "rope");
  expect_rejected(with("/model/extra"_json_pointer, 1), "model.extra", "unknown key");
  expect_rejected(with("/comment"_json_pointer, "hi"), "comment", "unknown key");
  expect_rejected(with("/layers"_json_pointer, json::array({good["layers"][0]})), "layers", "2 entries", "1 entries");
  expect_rejected(with("/layers"_json_pointer, json::object()), "layers", "a JSON array");
  expect_rejected(with("/layers/1"_json_pointer, 7), "layers[1]", "a JSON object");
  expect_rejected(with("/layers/0/retrieval_heads"_json_pointer, json::array({0, 4})), "layers[0].retrieval_heads[1]",
                  "unknown head 4");
  expect_rejected(with("/layers/0/retrieval_heads"_json_pointer, json::array({-1})), "layers[0].retrieval_heads[0]",
                  "unknown head -1");
  expect_rejected(with("/layers/0/retrieval_heads"_json_pointer, json::array({2, 2})), "retrieval_heads[1]",
                  "listed once");
  expect_rejected(with("/layers/0/retrieval_heads"_json_pointer, json::array({1.5})), "retrieval_heads[0]",
                  "an integer");
  expect_rejected(with("/layers/1/windows"_json_pointer, json::array({1, 2, 3})), "layers[1].windows",
                  "4 entries (one per kv head)");
  expect_rejected(with("/layers/1/windows/2"_json_pointer, 0), "layers[1].windows[2]", "[1, ");
  expect_rejected(with("/layers/1/budgets/0"_json_pointer, "many"), "layers[1].budgets[0]", "an integer");
  expect_rejected(with("/layers/0/echo/1"_json_pointer, nullptr), "layers[0].echo[1]", "a number");
  expect_rejected(with("/layers/0/head_9"_json_pointer, json::array()), "layers[0].head_9", "unknown key");
  expect_rejected(with("/layers/1/bases/keys"_json_pointer, 5), "layers[1].bases.keys", "a string");
  expect_rejected(with("/calibration/method"_json_pointer, "duo_attention"), "calibration.method");
  expect_rejected(with("/calibration/probe/repeats"_json_pointer, 1), "probe.repeats");
  expect_rejected(with("/calibration/probe/seed"_json_pointer, -1), "calibration.probe.seed");
  expect_rejected(with("/calibration/echo_fraction"_json_pointer, 2.0), "selection.echo_fraction");
  expect_rejected(json::array(), "(file)", "a JSON object");
}

TEST(Profile, UnreadableOrInvalidTextThrows) {
  EXPECT_THROW(kt::io::load_profile(temp_path("does_not_exist_at_all")), kt::error);
  try {
    kt::io::parse_profile("{\"format\": \"kvtrim.profile\", ");
    FAIL() << "truncated JSON accepted";
  } catch (const kt::error& failure) {
    EXPECT_NE(std::string(failure.what()).find("well-formed JSON"), std::string::npos) << failure.what();
  }
  auto bad = sample_profile();
  bad.layers[0].budgets = {1, 2};  // two budgets for four kv heads
  EXPECT_THROW(kt::io::save_profile(bad, temp_path("never_written")), kt::error);
  EXPECT_FALSE(std::filesystem::exists(temp_path("never_written")));
}

TEST(Profile, RazorCalibrationFillsTheProfile) {
  const kt::model_shape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
  kt::score::retrieval_head::head_scores scores;
  scores.layers = 2;
  scores.shape = shape;
  scores.induction_kv = {0.1, 0.9, 0.2, 0.3};
  scores.echo_kv = {0.0, 0.0, 0.8, 0.1};
  auto data = kt::io::profile::for_model({.layers = 2, .shape = shape, .encoding = kt::io::positions::rope});
  data.set_retrieval_heads(scores, {.induction_fraction = 0.25, .echo_fraction = 0.25}, {});
  EXPECT_EQ(data.layers[0].retrieval, (std::vector<bool>{false, true}));
  EXPECT_EQ(data.layers[1].retrieval, (std::vector<bool>{true, false}));
  EXPECT_EQ(data.layers[1].induction, (std::vector<double>{0.2, 0.3}));
  ASSERT_TRUE(data.razor.has_value());
  scores.layers = 3;
  EXPECT_THROW(data.set_retrieval_heads(scores, {}, {}), kt::error);
}

// ---- profile → policy configs ---------------------------------------------------------

TEST(Profile, PerHeadBudgetAndWindowsComeFromTheLoadedProfile) {
  const auto path = temp_path("configs");
  kt::io::save_profile(sample_profile(), path);
  const auto loaded = kt::io::load_profile(path, sample_profile().model);
  std::filesystem::remove(path);
  const kt::model_shape shape = loaded.model.shape;

  const auto budget = loaded.per_head_budget(shape, 1);
  EXPECT_EQ(budget.lengths, (std::vector<std::int64_t>{1, 2, 3, 4}));
  EXPECT_EQ(budget.kv_heads, 4);
  EXPECT_EQ(budget.layer, 0);  // a one-layer table
  EXPECT_NO_THROW(budget.validate("test"));

  const auto window = loaded.static_window_config(shape, 1, 2);
  EXPECT_EQ(window.sinks, 2);
  EXPECT_EQ(window.windows, (std::vector<std::int64_t>{4096, 512, 128, 100000}));
  EXPECT_EQ(loaded.window_budget(shape, 1, 2).lengths, (std::vector<std::int64_t>{4098, 514, 130, 100002}));
  EXPECT_EQ(loaded.static_window_config(shape, 1).sinks, 4);  // StreamingLLM's default
}

TEST(Profile, ConfigsForAnotherShapeOrAMissingLayerAreErrors) {
  const auto data = sample_profile();
  const kt::model_shape shape = data.model.shape;
  const auto expect_error = [](auto&& call, const std::string& field, const std::string& detail) {
    try {
      call();
      ADD_FAILURE() << "accepted; expected an error about " << field;
    } catch (const kt::error& failure) {
      const std::string message = failure.what();
      EXPECT_NE(message.find(field), std::string::npos) << message;
      EXPECT_NE(message.find(detail), std::string::npos) << message;
    }
  };
  expect_error([&] { (void)data.per_head_budget(shape, 0); }, "layers[0].budgets", "none in this profile");
  expect_error([&] { (void)data.static_window_config(shape, 0); }, "layers[0].windows", "none in this profile");
  expect_error([&] { (void)data.per_head_budget(shape, 2); }, "'layer'", "[0, 2)");
  expect_error([&] { (void)data.window_budget(shape, -1); }, "'layer'", "-1");
  expect_error([&] { (void)data.per_head_budget({.q_heads = 8, .kv_heads = 2, .head_dim = 64}, 1); },
               "model.kv_heads", "2 (the model's)");
  expect_error([&] { (void)data.static_window_config({.q_heads = 16, .kv_heads = 4, .head_dim = 64}, 1); },
               "model.q_heads", "8 (the profile's)");
  expect_error([&] { (void)data.per_head_budget({.q_heads = 8, .kv_heads = 4, .head_dim = 128}, 1); },
               "model.head_dim", "64");
  auto bad = data;  // built in memory, never validated by a load
  bad.layers[1].budgets = {1, 2, 3};
  expect_error([&] { (void)bad.per_head_budget(shape, 1); }, "layers[1].budgets", "4 entries");
  bad.layers[1].budgets = {1, 2, 3, 4};
  expect_error([&] { (void)bad.static_window_config(shape, 1, -1); }, "config.score.sinks", "-1");
}

TEST(Profile, AlibiWindowsThroughAProfileKeepSinksAndWindowPerHead) {
  // ALiBi windows L_h = ⌈c / m⌉ with c = 1 for slopes 2^-1 … 2^-8 over 8 query heads:
  // 2, 4, …, 256; a kv head takes its pair's longer window: {4, 16, 64, 256}.
  const kt::model_shape shape{.q_heads = 8, .kv_heads = 4, .head_dim = 8};
  auto data = kt::io::profile::for_model({.layers = 1, .shape = shape, .encoding = kt::io::positions::alibi});
  data.layers[0].windows = kt::score::static_window::alibi_windows(8, 4, 1.0);
  ASSERT_EQ(data.layers[0].windows, (std::vector<std::int64_t>{4, 16, 64, 256}));
  const auto path = temp_path("alibi");
  kt::io::save_profile(data, path);
  const auto loaded = kt::io::load_profile(path, data.model);
  std::filesystem::remove(path);

  using scheme = kt::scheme<kt::layout::paged, kt::score::static_window, kt::budget::per_head, kt::codec::fp32,
                            kt::backend::cpu>;
  const std::int64_t batch = 2, tokens = 300, sinks = 4;
  const scheme::config cfg{.score = loaded.static_window_config(shape, 0, sinks),
                           .budget = loaded.window_budget(shape, 0, sinks)};
  const auto keys = kt::testing::random_tensor<float, 4>({batch, 4, tokens, 8}, 71);
  const auto values = kt::testing::random_tensor<float, 4>({batch, 4, tokens, 8}, 72);
  auto cache = scheme::make_cache(shape, batch, kt::layout::paged::pool_size{batch * 4 * 19}, kt::codec::fp32::config{});
  std::vector<std::byte> scratch(scheme::compress_workspace(shape, batch, tokens, cfg));
  scheme::compress(keys.cview(), values.cview(), cache.view(), cfg, kt::workspace{scratch.data(), scratch.size()});
  const auto kept = [&](std::int64_t, std::int64_t h) {
    const std::int64_t window = loaded.layers[0].windows[static_cast<std::size_t>(h)];
    return kt::testing::kept_tokens{kt::testing::sinks_and_recent(tokens, sinks + window, sinks), {}};
  };
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < 4; ++h) {
      const auto set = kept(b, h).tokens;
      ASSERT_EQ(cache.view().head_length(b, h), static_cast<std::int64_t>(set.size()));
      for (std::size_t i = 0; i < set.size(); ++i)
        EXPECT_EQ(kt::testing::stored_key(cache.view(), b, h, static_cast<std::int64_t>(i)),
                  kt::testing::input_row(keys.cview(), b, h, set[i]));
    }
  const auto queries = kt::testing::random_tensor<float, 3>({batch, 8, 8}, 73);
  auto out = kt::testing::make_tensor<float, 3>({batch, 8, 8});
  scheme::attend(queries.cview(), cache.view(), out.view, kt::workspace{});
  // fp32 attention over ≤ 260 tokens: ≲ (T + D)·2^-24·max|v| ≈ 1e-4 worst case; 1e-4.
  EXPECT_LT(kt::testing::max_abs_error(out.view, kt::testing::oracle_attention(queries.cview(), keys.cview(),
                                                                               values.cview(), 4, kept)),
            1e-4);
}
