"""Kept sets and decode attention through kvtrim.Cache against NumPy brute force.

With codec FP32 the cache stores the input rows exactly, so Cache.read() gives
back exactly which tokens each head kept; those sets must equal the NumPy
reimplementations of StreamingLLM and SnapKV, and attend() must land within the
derived fp32 bound of a double-precision oracle over those tokens.
"""

import numpy as np
import pytest

import kvtrim
from oracle import (attention, attention_bound, kept_by_head, positions_by_head, random_layer, resolve_keep, snapkv_scores,
                    streaming_kept, top_k)


def kept_tokens(cache, keys, b, h):
    """Which input tokens head (b, h) holds, by matching its stored rows (exact under FP32)."""
    stored, _ = cache.read(b, h)
    rows = {keys[b, h, t].tobytes(): t for t in range(keys.shape[2])}
    return sorted(rows[row.tobytes()] for row in stored)


def capacity_for(layout, batch, kv_heads, per_head):
    return per_head if layout == "contiguous" else batch * kv_heads * (per_head + 16)


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
@pytest.mark.parametrize("batch,q_heads,kv_heads,tokens,sinks,keep", [
    (1, 4, 2, 64, 4, 16),
    (2, 8, 2, 100, 4, 33),
    (1, 2, 2, 40, 0, 7),
    (2, 3, 1, 20, 6, 4),   # keep < sinks: the first `keep` sinks
    (1, 4, 4, 10, 4, 50),  # keep > T: everything
])
def test_streaming_llm_kept_set_and_attention(rng, layout, batch, q_heads, kv_heads, tokens, sinks, keep):
    dim = 16
    keys, values, _ = random_layer(rng, batch, q_heads, kv_heads, tokens, dim)
    queries = rng.standard_normal((batch, q_heads, dim)).astype(np.float32)
    press = kvtrim.StreamingLLM(sinks=sinks, tokens=keep)
    cache = kvtrim.Cache(press, kvtrim.FP32(), layout, (q_heads, kv_heads, dim), batch,
                         capacity_for(layout, batch, kv_heads, min(keep, tokens)))
    cache.compress(keys, values)
    want = streaming_kept(tokens, sinks, min(keep, tokens))
    kept_k, kept_v = [], []
    for b in range(batch):
        kept_k.append([]), kept_v.append([])
        for h in range(kv_heads):
            assert kept_tokens(cache, keys, b, h) == want
            kept_k[b].append(keys[b, h, want]), kept_v[b].append(values[b, h, want])
    assert list(cache.head_lengths()) == [len(want)] * (batch * kv_heads)
    assert kept_by_head(cache) == [want] * (batch * kv_heads)
    assert positions_by_head(cache) == [want] * (batch * kv_heads)  # the prefill starts at position 0
    out = cache.attend(queries)
    assert out.dtype == np.float32 and out.shape == queries.shape
    oracle = attention(queries, kept_k, kept_v, kv_heads)
    assert np.all(np.abs(out - oracle) <= attention_bound(queries, kept_k, kept_v, kv_heads))


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
@pytest.mark.parametrize("batch,q_heads,kv_heads,tokens,window,kernel,ratio", [
    (1, 4, 2, 64, 8, 5, 0.5),
    (2, 8, 2, 96, 16, 3, 0.75),
    (1, 2, 1, 40, 4, 1, 0.3),
])
def test_snapkv_kept_set_and_attention(rng, layout, batch, q_heads, kv_heads, tokens, window, kernel, ratio):
    dim = 16
    keys, values, window_queries = random_layer(rng, batch, q_heads, kv_heads, tokens, dim, window=window + 3)
    queries = rng.standard_normal((batch, q_heads, dim)).astype(np.float32)
    press = kvtrim.SnapKV(window=window, kernel=kernel, compression_ratio=ratio)
    keep = resolve_keep(tokens, compression_ratio=ratio)
    cache = kvtrim.Cache(press, kvtrim.FP32(), layout, (q_heads, kv_heads, dim), batch, capacity_for(layout, batch, kv_heads, keep))
    cache.compress(keys, values, window_queries)
    kept, positions = kept_by_head(cache), positions_by_head(cache)
    kept_k, kept_v = [], []
    for b in range(batch):
        scores = snapkv_scores(keys[b], window_queries[b], window, kernel)
        kept_k.append([]), kept_v.append([])
        for h in range(kv_heads):
            want = top_k(list(scores[h]), keep)
            assert kept_tokens(cache, keys, b, h) == want, (b, h)
            assert kept[b * kv_heads + h] == want and positions[b * kv_heads + h] == want, (b, h)
            kept_k[b].append(keys[b, h, want]), kept_v[b].append(values[b, h, want])
    out = cache.attend(queries)
    oracle = attention(queries, kept_k, kept_v, kv_heads)
    assert np.all(np.abs(out - oracle) <= attention_bound(queries, kept_k, kept_v, kv_heads))


def test_adakv_keeps_the_layer_total_and_protects_the_window(rng):
    batch, q_heads, kv_heads, tokens, dim, window = 1, 8, 4, 80, 16, 8
    keys, values, window_queries = random_layer(rng, batch, q_heads, kv_heads, tokens, dim, window=window)
    press = kvtrim.AdaKV(kvtrim.SnapKV(window=window, compression_ratio=0.6), alpha=0.2)
    cache = kvtrim.Cache(press, kvtrim.FP32(), "flat", (q_heads, kv_heads, dim), batch, kv_heads * tokens)
    cache.compress(keys, values, window_queries)
    lengths = cache.head_lengths()
    k = resolve_keep(tokens, compression_ratio=0.6)
    assert lengths.sum() == kv_heads * k
    reported = kept_by_head(cache)
    assert positions_by_head(cache) == reported
    for h in range(kv_heads):
        kept = kept_tokens(cache, keys, 0, h)
        assert reported[h] == kept
        assert int(np.floor(0.2 * k)) <= len(kept)
        assert set(range(tokens - window, tokens)) <= set(kept)  # the observation window (+inf) stays


def test_append_then_attend_reads_the_new_tokens(rng):
    batch, q_heads, kv_heads, tokens, dim = 1, 4, 2, 32, 8
    keys, values, _ = random_layer(rng, batch, q_heads, kv_heads, tokens, dim)
    new_k, new_v, _ = random_layer(rng, batch, q_heads, kv_heads, 3, dim)
    queries = rng.standard_normal((batch, q_heads, dim)).astype(np.float32)
    for layout in ("contiguous", "flat", "paged"):
        cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=2, tokens=8), kvtrim.FP32(), layout, (q_heads, kv_heads, dim), batch,
                             capacity_for(layout, batch, kv_heads, 11))
        cache.compress(keys, values)
        cache.append(new_k, new_v)
        want = streaming_kept(tokens, 2, 8)
        kept_k = [[np.concatenate([keys[0, h, want], new_k[0, h]]) for h in range(kv_heads)]]
        kept_v = [[np.concatenate([values[0, h, want], new_v[0, h]]) for h in range(kv_heads)]]
        for h in range(kv_heads):
            stored, _ = cache.read(0, h)
            assert np.array_equal(stored, kept_k[0][h])
        assert kept_by_head(cache) == [want] * kv_heads  # append does not change the last compress's selection
        assert positions_by_head(cache) == [want + [tokens, tokens + 1, tokens + 2]] * kv_heads, layout
        out = cache.attend(queries)
        oracle = attention(queries, kept_k, kept_v, kv_heads)
        assert np.all(np.abs(out - oracle) <= attention_bound(queries, kept_k, kept_v, kv_heads)), layout


def test_fp16_inputs_give_the_results_of_their_float32_widening(rng):
    """CPU caches widen float16 inputs to float32 (exact): same bits as passing the widened arrays."""
    keys, values, wq = random_layer(rng, 1, 4, 2, 48, 16, window=8, dtype=np.float16)
    queries = rng.standard_normal((1, 4, 16)).astype(np.float16)
    outs = []
    for cast in (lambda x: x, lambda x: x.astype(np.float32)):
        cache = kvtrim.Cache(kvtrim.SnapKV(window=8, compression_ratio=0.5), kvtrim.FP16(), "paged", (4, 2, 16), 1, 64)
        cache.compress(cast(keys), cast(values), cast(wq))
        outs.append(cache.attend(cast(queries)))
    assert np.array_equal(outs[0], outs[1])


def test_strided_inputs_are_read_in_place(rng):
    """A view with padded strides (last axis contiguous) gives the results of its dense copy."""
    big_k = rng.standard_normal((2, 3, 50, 24)).astype(np.float32)
    big_v = rng.standard_normal((2, 3, 50, 24)).astype(np.float32)
    keys, values = big_k[:, 1:3, 5:45, :16], big_v[:, 1:3, 5:45, :16]
    queries = rng.standard_normal((2, 4, 16)).astype(np.float32)
    outs = []
    for k, v in ((keys, values), (np.ascontiguousarray(keys), np.ascontiguousarray(values))):
        cache = kvtrim.Cache(kvtrim.KeyNorm(compression_ratio=0.5), kvtrim.FP32(), "contiguous", (4, 2, 16), 2, 20)
        cache.compress(k, v)
        outs.append(cache.attend(queries))
    assert np.array_equal(outs[0], outs[1])


def prefill_lse(keys, window_queries):
    """The prefill attention's softmax normalisers (ln of the sum of exp(q.k / sqrt(D)) over the
    keys each observed query sees, causal), in double: what FlashAttention returns as softmax_lse."""
    batch, kv_heads, tokens, dim = keys.shape
    q_heads, observed = window_queries.shape[1], window_queries.shape[2]
    lse = np.empty((batch, q_heads, observed), np.float32)
    for b in range(batch):
        for g in range(q_heads):
            logits = window_queries[b, g].astype(np.float64) @ keys[b, g // (q_heads // kv_heads)].astype(np.float64).T
            logits /= np.sqrt(dim)
            for t in range(observed):
                row = logits[t, :tokens - observed + t + 1]
                top = row.max()
                lse[b, g, t] = top + np.log(np.exp(row - top).sum())
    return lse


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
def test_snapkv_with_the_prefills_normalisers_keeps_what_it_computes(rng, layout):
    batch, q_heads, kv_heads, tokens, dim, window, ratio = 2, 8, 2, 100, 16, 8, 0.6
    keys, values, window_queries = random_layer(rng, batch, q_heads, kv_heads, tokens, dim, window=window + 3)
    press = kvtrim.SnapKV(window=window, kernel=5, compression_ratio=ratio)
    keep = resolve_keep(tokens, compression_ratio=ratio)
    cache = kvtrim.Cache(press, kvtrim.FP32(), layout, (q_heads, kv_heads, dim), batch, capacity_for(layout, batch, kv_heads, keep))
    cache.compress(keys, values, window_queries, lse=prefill_lse(keys, window_queries))
    for b in range(batch):
        scores = snapkv_scores(keys[b], window_queries[b], window, 5)
        for h in range(kv_heads):
            assert kept_tokens(cache, keys, b, h) == top_k(list(scores[h]), keep), (b, h)
    # Normalisers 50 too large in query head 0's rows scale its probabilities by e^-50: kv head 0
    # then ranks as its other three query heads alone do, so the given values are what the scores
    # are made of (not recomputed).
    shifted = prefill_lse(keys, window_queries)
    shifted[0, 0] += 50.0
    cache.compress(keys, values, window_queries, lse=shifted)
    scores = snapkv_scores(keys[0, :1], window_queries[0, 1:4], window, 5)
    assert kept_tokens(cache, keys, 0, 0) == top_k(list(scores[0]), keep)
