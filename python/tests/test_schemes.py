"""Every compiled CPU scheme: compress, append, attend, stats — attention over what the cache holds.

For each scheme in kvtrim.schemes(), a small GQA layer is compressed, two tokens
are appended, and attend() is compared with a double-precision oracle over the
rows the cache holds (Cache.read(): the dequantized rows). Plain codecs must
land within the fp32 bound (the rows read back are what attention reads);
KIVI's int8 reader dequantizes in its own order, so it gets a looser 1e-5·V.
"""

import numpy as np
import pytest

import kvtrim
from oracle import attention, attention_bound, kept_by_head, positions_by_head, random_layer, top_k

CPU_SCHEMES = [s for s in kvtrim.schemes() if s[0] == "cpu"]
CODECS = {"fp16": kvtrim.FP16(), "bf16": kvtrim.BF16(), "fp32": kvtrim.FP32(), "int8": kvtrim.KIVI(bits=8, group=8),
          "int4": kvtrim.KIVI(bits=4, group=8), "fp8": kvtrim.FP8(), "low_rank": kvtrim.LowRank(rank=6),
          "layered<int8>": kvtrim.Layered(kvtrim.KIVI(bits=8, group=8), sinks=2, recent=4),
          "layered<int4>": kvtrim.Layered(kvtrim.KIVI(bits=4, group=8), sinks=2, recent=4)}
# Codecs whose attention reads stored codes in an order of its own (dequantize-then-dot, or for low-rank
# (Uᵀq)·c instead of q·(Uc)): they get the looser 1e-5·max|v| of the module docstring, not the fp32 bound.
STATS_NAME = {"fp8": "fp8_e4m3", "layered<int8>": "layered", "layered<int4>": "layered"}  # kvtrim::stats' codec names
READS_IN_ITS_OWN_ORDER = ("int8", "int4", "fp8", "low_rank", "layered<int8>", "layered<int4>")
BATCH, Q_HEADS, KV_HEADS, TOKENS, DIM, WINDOW, APPENDED = 2, 4, 2, 40, 16, 6, 2


def make_press(scorer, budget):
    if scorer == "retrieval_head":
        return kvtrim.RazorAttention([[True, False]] * 4, sinks=2, min_recent=8, recent_fraction=0.1, compensation=False)
    inner = {
        "static_window": kvtrim.StreamingLLM(sinks=2, compression_ratio=0.5),
        "snapkv": kvtrim.SnapKV(window=WINDOW, kernel=3, compression_ratio=0.5),
        "h2o": kvtrim.H2O(recent=0.1, compression_ratio=0.5),
        "key_norm": kvtrim.KeyNorm(compression_ratio=0.5),
        "external": kvtrim.ExternalScores(compression_ratio=0.5),
    }[scorer]
    return {"uniform": inner, "adaptive": kvtrim.AdaKV(inner, alpha=0.2), "pyramid": kvtrim.Pyramid(inner, window=2)}[budget]


def test_the_list_is_the_documented_one():
    assert len(CPU_SCHEMES) == 233  # registry_cpu.cpp: 156 + registry_cpu_codecs.cpp's 77
    assert ("cpu", "flat", "h2o", "pyramid", "low_rank") in CPU_SCHEMES
    assert ("cpu", "paged", "snapkv", "adaptive", "layered<int4>") in CPU_SCHEMES
    assert ("cpu", "paged", "key_norm", "uniform", "int4") not in CPU_SCHEMES  # paged: the CUDA list's twins only
    assert ("cpu", "contiguous", "snapkv", "adaptive", "fp16") not in CPU_SCHEMES
    assert ("cpu", "flat", "retrieval_head", "by_scorer", "int8") in CPU_SCHEMES
    assert ("cpu", "paged", "retrieval_head", "by_scorer", "fp16") in CPU_SCHEMES
    assert ("cpu", "paged", "external", "adaptive", "int8") in CPU_SCHEMES
    assert ("cpu", "contiguous", "external", "uniform", "bf16") in CPU_SCHEMES


@pytest.mark.parametrize("scheme", CPU_SCHEMES, ids=["-".join(s[1:]) for s in CPU_SCHEMES])
def test_scheme_round_trip(rng, scheme):
    _, layout, scorer, budget, codec = scheme
    keys, values, queries_all = random_layer(rng, BATCH, Q_HEADS, KV_HEADS, TOKENS, DIM)
    new_k, new_v, _ = random_layer(rng, BATCH, Q_HEADS, KV_HEADS, APPENDED, DIM)
    queries = rng.standard_normal((BATCH, Q_HEADS, DIM)).astype(np.float32)
    capacity = TOKENS + APPENDED if layout == "contiguous" else BATCH * KV_HEADS * (TOKENS + APPENDED + 16)
    cache = kvtrim.Cache(make_press(scorer, budget), CODECS[codec], layout, (Q_HEADS, KV_HEADS, DIM), BATCH, capacity,
                         layer=1, layers=4)
    assert cache.name == f"scheme<layout::{layout}, score::{scorer}, budget::{budget}, codec::{codec}, backend::cpu>"
    scores = rng.standard_normal((BATCH, KV_HEADS, TOKENS)).astype(np.float32)  # ExternalScores only
    cache.compress(keys, values, queries_all, scores=scores)  # H2O reads all T queries, SnapKV the last WINDOW
    before = cache.head_lengths().copy()
    assert np.all(before >= 1) and np.all(before <= TOKENS)
    if budget == "uniform" and scorer != "retrieval_head":
        assert np.all(before == TOKENS // 2)
    kept = kept_by_head(cache)
    assert [len(head) for head in kept] == list(before)
    assert all(0 <= head[0] and head[-1] < TOKENS for head in kept)
    assert positions_by_head(cache) == kept  # no compensation token here: positions are the kept tokens
    if scorer == "external" and budget == "uniform":  # the caller's scores, top-k per head (ties: lower index)
        assert kept == [top_k(list(scores[b, h]), TOKENS // 2) for b in range(BATCH) for h in range(KV_HEADS)]
    if codec == "fp32":  # rows stored exactly: the rows held are those of the kept tokens
        for b in range(BATCH):
            for h in range(KV_HEADS):
                assert np.array_equal(cache.read(b, h)[0], keys[b, h, kept[b * KV_HEADS + h]])
    cache.append(new_k, new_v)
    assert np.array_equal(cache.head_lengths(), before + APPENDED)
    assert kept_by_head(cache) == kept
    assert positions_by_head(cache) == [head + list(range(TOKENS, TOKENS + APPENDED)) for head in kept]
    out = cache.attend(queries)
    held = [[cache.read(b, h) for h in range(KV_HEADS)] for b in range(BATCH)]
    kept_k = [[k for k, _ in row] for row in held]
    kept_v = [[v for _, v in row] for row in held]
    oracle = attention(queries, kept_k, kept_v, KV_HEADS)
    error = np.abs(out - oracle)
    if codec in READS_IN_ITS_OWN_ORDER:
        assert np.all(error <= 1e-5 * np.max([np.abs(v).max() for row in kept_v for v in row]))
    else:
        assert np.all(error <= attention_bound(queries, kept_k, kept_v, KV_HEADS))
    stats = cache.stats()
    assert stats["codec"] == STATS_NAME.get(codec, codec) and list(stats["kept"]) == list(cache.head_lengths())
    assert stats["allocated_bytes"] == cache.bytes > 0
    if codec != "fp32":
        assert stats["bytes_per_token"] <= 2 * DIM * 2  # per token no more than fp16 (int8: per-head state aside)


def test_razor_attention_with_compensation_runs(rng):
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    cache = kvtrim.Cache(kvtrim.RazorAttention([[False, True]], sinks=2, min_recent=8, recent_fraction=0.1),
                         kvtrim.FP16(), "flat", (4, 2, 16), 1, 256)
    cache.compress(keys, values)
    lengths = cache.head_lengths()
    assert lengths[1] == 64 and lengths[0] == 2 + 8 + 1  # sinks + recent + the compensation token
    # The compensation token stands for the dropped span [2, 56) and carries its last position
    # (docs/composition.md §1); kept() reports the slot the selection gave it.
    positions = positions_by_head(cache)
    assert positions[0] == [0, 1, 55] + list(range(56, 64)) and positions[1] == list(range(64))
    kept = kept_by_head(cache)
    assert kept[0][:2] == [0, 1] and kept[0][3:] == list(range(56, 64)) and kept[1] == list(range(64))
    cache.append(keys[:, :, :1], values[:, :, :1])
    assert positions_by_head(cache) == [positions[0] + [64], positions[1] + [64]]  # the compensation token does not advance it
    assert np.all(np.isfinite(cache.attend(rng.standard_normal((1, 4, 16)).astype(np.float32))))


@pytest.mark.skipif(not kvtrim.has_profiles, reason="built without nlohmann-json")
def test_razor_attention_from_a_saved_profile(rng, tmp_path):
    profile = kvtrim.Profile.for_retrieval_heads([[True, False], [False, False]], q_heads=4, head_dim=16)
    path = tmp_path / "profile.json"
    profile.save(str(path))
    press = kvtrim.RazorAttention(str(path), sinks=2, min_recent=8, recent_fraction=0.1)
    assert press.flags(0) == [True, False] and press.flags(1) == [False, False]
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    cache = kvtrim.Cache(press, kvtrim.FP16(), "flat", (4, 2, 16), 1, 256, layer=0, layers=2)
    cache.compress(keys, values)
    assert cache.head_lengths()[0] == 64


def test_contiguous_kivi_capacity_is_the_one_asked_for(rng):
    """The owning contiguous cache pads its head stride to whole key groups itself; the capacity stays as given."""
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=2, tokens=20), kvtrim.KIVI(group=8), "contiguous", (4, 2, 16), 1, 21)
    cache.compress(keys, values)
    cache.append(keys[:, :, :1], values[:, :, :1])
    assert list(cache.head_lengths()) == [21, 21]
    assert positions_by_head(cache) == [[0, 1] + list(range(46, 64)) + [64]] * 2
    with pytest.raises(kvtrim.Error, match=r"expected at most 0 tokens \(capacity 21, holding 21\), got 1 tokens"):
        cache.append(keys[:, :, :1], values[:, :, :1])
