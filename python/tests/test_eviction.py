"""kvtrim.Eviction (decode-time eviction, issue 16) from Python, against oracles written here.

A 2-layer model (4 query heads over 2 kv heads of 16, batch 2), 96 prompt tokens compressed by SnapKV to
keep − interval, then decode steps that append one token per layer and attend through Eviction.attend,
with an eviction step every `interval` steps. Checked:
  - attention: Eviction.attend equals a double-precision oracle over the rows the cache holds
    (oracle.attention_bound: the fp32 bound of decode attention over those rows) — the metric does not
    change what attention computes;
  - the metric: an oracle recomputes it from the rows and positions the cache holds (prefill seed:
    Σ over the window queries and the GQA group of p², the causal softmax over all prompt keys;
    each decode step adds Σ_g p² for tokens older than the protected window), and per head, the
    tokens an eviction step keeps are the protected ones (sinks, the window) plus the highest by
    that metric — every dropped candidate ranks no higher than every kept one, within the
    metric's fp32 accumulation error: ≤ W·G + STEPS·G additions into a sum ≤ the largest metric,
    each off by ≤ 2^-24 of it, and the probabilities' own fp32 error (oracle.py's (2n + D + 5)·2^-24
    relative, n ≤ 64): under 2^-20·STEPS·largest at these sizes;
  - budget: after every step each head (per_head scope) holds keep − interval tokens, and the
    report counts what went.
"""

import numpy as np
import pytest

import kvtrim
from oracle import attention, attention_bound, positions_by_head

B, HQ, HKV, D, T, LAYERS = 2, 4, 2, 16, 96, 2
GROUP = HQ // HKV
WINDOW_QUERIES, SINKS, PROTECTED = 8, 2, 8
KEEP, INTERVAL, STEPS = 40, 8, 24


def setup(rng):
    keys = [rng.standard_normal((B, HKV, T, D)).astype(np.float16).astype(np.float32) for _ in range(LAYERS)]
    values = [rng.standard_normal((B, HKV, T, D)).astype(np.float16).astype(np.float32) for _ in range(LAYERS)]
    window = [rng.standard_normal((B, HQ, WINDOW_QUERIES, D)).astype(np.float32) for _ in range(LAYERS)]
    caches = [kvtrim.Cache(kvtrim.SnapKV(window=WINDOW_QUERIES, kernel=3, tokens=KEEP - INTERVAL), kvtrim.FP16(),
                           "paged", (HQ, HKV, D), B, B * HKV * (KEEP + STEPS + 16), layer=l, layers=LAYERS, page_size=8)
              for l in range(LAYERS)]
    eviction = kvtrim.Eviction(caches, keep=KEEP, interval=INTERVAL, scope="per_head", sinks=SINKS,
                               protected_window=PROTECTED)
    for l, cache in enumerate(caches):
        cache.compress(keys[l], values[l], window[l])
        eviction.seed(l, keys[l], window[l])
    return keys, values, window, caches, eviction


def seed_oracle(keys, window, kept_positions):
    """{(b, h): {position: metric}} of the prefill seed (positions are prompt token indices here)."""
    metric = {}
    for b in range(B):
        for h in range(HKV):
            k = keys[b, h].astype(np.float64)
            total = np.zeros(T)
            for g in range(GROUP):
                q = window[b, h * GROUP + g].astype(np.float64)
                logits = q @ k.T / np.sqrt(D)
                for i in range(WINDOW_QUERIES):  # window query i sits at position T − w + i: causal
                    visible = T - WINDOW_QUERIES + i + 1
                    p = np.exp(logits[i, :visible] - logits[i, :visible].max())
                    total[:visible] += (p / p.sum()) ** 2
            metric[(b, h)] = {pos: (total[pos] if T - pos > PROTECTED else 0.0) for pos in kept_positions[b * HKV + h]}
    return metric


def test_eviction_keeps_the_highest_metric_and_attention_is_unchanged(rng):
    keys, values, window, caches, eviction = setup(rng)
    oracle = [seed_oracle(keys[l], window[l], positions_by_head(caches[l])) for l in range(LAYERS)]
    evicted_total = 0
    for step in range(1, STEPS + 1):
        position = T + step - 1
        for l, cache in enumerate(caches):
            k = rng.standard_normal((B, HKV, 1, D)).astype(np.float16).astype(np.float32)
            v = rng.standard_normal((B, HKV, 1, D)).astype(np.float16).astype(np.float32)
            q = rng.standard_normal((B, HQ, D)).astype(np.float32)
            cache.append(k, v)
            out = eviction.attend(l, q)
            held = [[cache.read(b, h) for h in range(HKV)] for b in range(B)]
            kept_k = [[row[0] for row in seq] for seq in held]
            kept_v = [[row[1] for row in seq] for seq in held]
            assert np.all(np.abs(out - attention(q, kept_k, kept_v, HKV)) <= attention_bound(q, kept_k, kept_v, HKV))
            positions = positions_by_head(cache)
            for b in range(B):
                for h in range(HKV):
                    metric = oracle[l][(b, h)]
                    metric[position] = 0.0
                    kk = kept_k[b][h].astype(np.float64)
                    for g in range(GROUP):
                        logits = kk @ q[b, h * GROUP + g].astype(np.float64) / np.sqrt(D)
                        p = np.exp(logits - logits.max())
                        p /= p.sum()
                        for i, pos in enumerate(positions[b * HKV + h]):
                            if position + 1 - pos > PROTECTED:
                                metric[pos] += p[i] ** 2
        if eviction.due(step):
            before = [positions_by_head(c) for c in caches]
            report = eviction.step()
            after = [positions_by_head(c) for c in caches]
            evicted = sum(len(h) for layer in before for h in layer) - sum(len(h) for layer in after for h in layer)
            assert report["evicted_tokens"] == evicted > 0
            evicted_total += evicted
            for l in range(LAYERS):
                for head, (was, now) in enumerate(zip(before[l], after[l])):
                    assert len(now) == KEEP - INTERVAL  # per_head scope: every head at its target
                    assert set(now) <= set(was) and len(set(now)) == len(now)
                    next_position = T + step
                    # Eviction fills holes with later kept tokens (token order is not kept); only the
                    # protected tail, the recent window, stays a sorted suffix.
                    window = [p for p in now if next_position - p <= PROTECTED]
                    assert now[len(now) - len(window):] == sorted(window), (l, head)
                    protected = {p for p in was if p < SINKS or next_position - p <= PROTECTED}
                    assert protected <= set(now)
                    metric = oracle[l][(head // HKV, head % HKV)]
                    kept = [metric[p] for p in now if p not in protected]
                    dropped = [metric[p] for p in was if p not in set(now)]
                    largest = max(metric.values())
                    assert min(kept) >= max(dropped) - 2.0 ** -20 * largest * STEPS, (l, head)
                    oracle[l][(head // HKV, head % HKV)] = {p: metric[p] for p in now}
    assert evicted_total > 0


def test_eviction_is_refused_for_schemes_it_is_not_compiled_for(rng):
    flat = kvtrim.Cache(kvtrim.SnapKV(window=4, tokens=8), kvtrim.FP16(), "flat", (HQ, HKV, D), 1, 64)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Eviction: argument 'cache': expected a cache on the paged "
                                           r"layout with codec fp16.*got scheme<layout::flat"):
        kvtrim.Eviction([flat], keep=16, interval=4)
    with pytest.raises(kvtrim.Error, match=r"argument 'scope': expected one of 'per_head', 'per_layer', 'cross_layer'"):
        kvtrim.Eviction([flat], keep=16, scope="global")
