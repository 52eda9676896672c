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


# ---- the metric one step late (one_step_late=True; eviction/metric.hpp's carry) ----------------------
#
# Twin models on the same prompt and the same decode inputs, one Eviction immediate and one one step
# late. The late metric is computed by the same arithmetic in the same order (step t − 1's terms are
# added before step t's, by the same dot products), so every comparison here is exact: np.array_equal
# on float32 buffers, and equal reports and kept positions.


def prefilled(keys, values, window, one_step_late, scope="per_head"):
    caches = [kvtrim.Cache(kvtrim.SnapKV(window=WINDOW_QUERIES, kernel=3, tokens=KEEP - INTERVAL), kvtrim.FP16(),
                           "paged", (HQ, HKV, D), B, B * HKV * (KEEP + STEPS + 16), layer=l, layers=LAYERS, page_size=8)
              for l in range(LAYERS)]
    eviction = kvtrim.Eviction(caches, keep=KEEP, interval=INTERVAL, scope=scope, sinks=SINKS,
                               protected_window=PROTECTED, one_step_late=one_step_late)
    for l, cache in enumerate(caches):
        cache.compress(keys[l], values[l], window[l])
        eviction.seed(l, keys[l], window[l])
    return caches, eviction


def twins(rng, scope="per_head"):
    keys = [rng.standard_normal((B, HKV, T, D)).astype(np.float16).astype(np.float32) for _ in range(LAYERS)]
    values = [rng.standard_normal((B, HKV, T, D)).astype(np.float16).astype(np.float32) for _ in range(LAYERS)]
    window = [rng.standard_normal((B, HQ, WINDOW_QUERIES, D)).astype(np.float32) for _ in range(LAYERS)]
    return prefilled(keys, values, window, False, scope), prefilled(keys, values, window, True, scope)


def decode_inputs(rng):
    k = rng.standard_normal((B, HKV, 1, D)).astype(np.float16).astype(np.float32)
    v = rng.standard_normal((B, HKV, 1, D)).astype(np.float16).astype(np.float32)
    return k, v, rng.standard_normal((B, HQ, D)).astype(np.float32)


@pytest.mark.parametrize("scope", ["per_head", "cross_layer"])
def test_one_step_late_metric_is_the_immediate_one_a_step_behind_and_equal_after_a_flush(rng, scope):
    (caches, now), (late_caches, late) = twins(rng, scope)
    assert late.one_step_late and not now.one_step_late
    for l in range(LAYERS):  # the seed: nothing pending yet, the same metric
        assert np.array_equal(late.metrics[l], now.metrics[l])
        assert not late.carries[l]["next"].any()
    previous = [m.copy() for m in now.metrics]  # the immediate metric after the previous step
    flushed = evictions = 0
    for step in range(1, STEPS + 1):
        for l in range(LAYERS):
            k, v, q = decode_inputs(rng)
            caches[l].append(k, v)
            late_caches[l].append(k, v)
            assert np.array_equal(late.attend(l, q), now.attend(l, q))  # attention itself is unchanged
            # Before a flush: the late metric after step t is the immediate one after step t − 1.
            assert np.array_equal(late.metrics[l], previous[l]), (step, l)
            assert (late.carries[l]["next"] == T + step).all()  # step t pending, at next position T + t
        assert not all(np.array_equal(a, b) for a, b in zip(late.metrics, now.metrics)), "step t must be pending"
        if step % 3 == 0:  # a flush now and then (and step() flushes): afterwards the same bits
            late.flush(step % 2)  # one layer ...
            assert not late.carries[step % 2]["next"].any()
            late.flush()  # ... then all (the flushed layer again: nothing pending, adds nothing)
            flushed += 1
            for l in range(LAYERS):
                assert np.array_equal(late.metrics[l], now.metrics[l]), (step, l)
                assert not late.carries[l]["next"].any()
        if now.due(step):
            report = now.step()
            assert late.step() == report  # flushes first: ranks what the immediate mode ranks
            assert report["evicted_tokens"] > 0
            evictions += 1
            for l in range(LAYERS):
                assert positions_by_head(late_caches[l]) == positions_by_head(caches[l]), (step, l)
                assert np.array_equal(late.metrics[l], now.metrics[l]), (step, l)  # across the eviction
        previous = [m.copy() for m in now.metrics]
    late.flush()
    for l in range(LAYERS):
        assert np.array_equal(late.metrics[l], now.metrics[l])
    assert flushed > 0 and evictions == STEPS // INTERVAL


def test_one_step_late_seed_drops_the_pending_step(rng):
    (caches, now), (late_caches, late) = twins(rng)
    k, v, q = decode_inputs(rng)
    late_caches[0].append(k, v)
    late.attend(0, q)
    assert (late.carries[0]["next"] > 0).all()
    late.carries[0]["queries"][:] = 1.0  # stale: what a new prefill must never score
    prompt, window = np.zeros((B, HKV, T, D), np.float32), np.zeros((B, HQ, WINDOW_QUERIES, D), np.float32)
    late_caches[0].compress(prompt, prompt, window)  # a new prefill replaces the tokens ...
    late.seed(0, prompt, window)  # ... and its seed drops the pending step
    assert not late.carries[0]["next"].any()
    seeded = late.metrics[0].copy()
    late.flush(0)  # nothing pending: nothing added
    assert np.array_equal(late.metrics[0], seeded)
    late.attend(1, q)  # layer 1 (no append here) has a step pending; clear() drops it unadded
    late.clear(1)
    before = late.metrics[1].copy()
    late.flush()
    assert not late.carries[1]["next"].any() and np.array_equal(late.metrics[1], before)
    now.flush()  # the immediate mode has nothing pending: a no-op
    assert now.carries is None


def test_one_step_late_refusals(rng):
    (caches, now), (late_caches, late) = twins(rng)
    k, v, q = decode_inputs(rng)
    late_caches[0].append(k, v)
    late.attend(0, q)
    n = {"queries": B * HQ * D, "normaliser": B * HQ * 2, "next": B * HKV}
    good = {name: a.copy() for name, a in late.carries[0].items()}
    metric = late.metrics[0].copy()

    def refused(pattern, call=lambda: late.attend(0, q)):
        before = {name: a.copy() for name, a in late.carries[0].items()}
        with pytest.raises(kvtrim.Error, match=pattern):
            call()
        # nothing written: the checks come before any work
        assert np.array_equal(late.metrics[0], metric)
        for name, a in before.items():
            assert np.array_equal(late.carries[0][name], a), name
        late.carries[0].update({name: a.copy() for name, a in good.items()})

    late.carries[0]["next"] = good["next"].astype(np.int32)
    refused(r"^kvtrim.Eviction.attend: argument 'carry_next': expected a contiguous 1-d int64 array on the cpu, "
            rf"got int32 \[{n['next']}\] on cpu$")
    late.carries[0]["queries"] = good["queries"].astype(np.float64)
    refused(r"^kvtrim.Eviction.attend: argument 'carry_queries': expected a contiguous 1-d float32 array on the cpu, "
            rf"got float64 \[{n['queries']}\] on cpu$")
    late.carries[0]["normaliser"] = np.zeros(n["normaliser"] + 1, np.float32)
    refused(r"^kvtrim.Eviction.attend: argument 'carry_normaliser': expected a contiguous float32 vector of "
            rf"{n['normaliser']} elements \(batch · q_heads · 2\), got float32 \[{n['normaliser'] + 1}\] on cpu$")
    late.carries[0]["queries"] = np.zeros(n["queries"] - 1, np.float32)
    refused(rf"argument 'carry_queries': expected a contiguous float32 vector of {n['queries']} elements",
            lambda: late.flush(0))
    late.carries[0]["next"] = np.zeros(n["next"] - 1, np.int64)
    refused(rf"^kvtrim.Eviction.seed: argument 'carry_next': expected a contiguous int64 vector of {n['next']} "
            rf"elements \(batch · kv_heads\), got int64 \[{n['next'] - 1}\] on cpu$",
            lambda: late.seed(0, np.zeros((B, HKV, T, D), np.float32), np.zeros((B, HQ, WINDOW_QUERIES, D), np.float32)))
    late.carries[0]["queries"] = good["queries"].reshape(B, HQ, D).copy()
    refused(r"argument 'carry_queries': expected a contiguous 1-d float32 array on the cpu, "
            rf"got float32 \[{B}, {HQ}, {D}\] on cpu$")
    late.carries[0]["normaliser"] = np.zeros(2 * n["normaliser"], np.float32)[::2]
    refused(r"argument 'carry_normaliser': expected a contiguous 1-d float32 array on the cpu, "
            rf"got float32 \[{n['normaliser']}\] \(strided\) on cpu$")
    # misaligned (a float32 view one byte into a buffer): eviction/metric.hpp's check
    late.carries[0]["queries"] = np.zeros(4 * n["queries"] + 4, np.uint8)[1:1 + 4 * n["queries"]].view(np.float32)
    refused(r"^kvtrim::eviction::attend: argument 'metric.carry': expected arrays aligned to their element types")
    # memory shared between carry arrays, or with the metric or the call's arrays
    shared = np.zeros(n["queries"] + n["normaliser"], np.float32)
    late.carries[0]["queries"], late.carries[0]["normaliser"] = shared[:n["queries"]], shared[n["queries"] - 1:-1]
    refused(r"argument 'carry_queries': expected an array of its own, got memory shared with carry_normaliser$")
    late.carries[0]["normaliser"] = late.metrics[0][:n["normaliser"]]
    refused(r"argument 'carry_normaliser': expected an array of its own, got memory shared with metric$")
    # a partial carry and a flush without one, through the bindings
    impl, settings = late_caches[0]._impl, late._metric
    out = np.empty_like(q)
    refused(r"^kvtrim.Eviction.attend: argument 'carry_normaliser': expected all three carry arrays "
            r"\(queries, normaliser, next\) or none \(immediate\), got None$",
            lambda: kvtrim._kvtrim._eviction_attend(impl, q, out, late.metrics[0], settings,
                                                    carry_queries=late.carries[0]["queries"]))
    refused(r"^kvtrim.Eviction.flush: argument 'carry': expected the carry of the metric one step late",
            lambda: kvtrim._kvtrim._eviction_flush_metric(impl, late.metrics[0], settings, None, None, None))
    refused(r"argument 'carry_queries': expected an array of its own, got memory shared with queries$",
            lambda: kvtrim._kvtrim._eviction_attend(impl, q, out, late.metrics[0], settings, carry_queries=q.reshape(-1),
                                                    carry_normaliser=good["normaliser"].copy(),
                                                    carry_next=good["next"].copy()))
    # the refused calls left the model usable: the next attend and a flush still match the immediate twin
    caches[0].append(k, v)
    now.attend(0, q)
    k2, v2, q2 = decode_inputs(rng)
    caches[0].append(k2, v2)
    late_caches[0].append(k2, v2)
    assert np.array_equal(late.attend(0, q2), now.attend(0, q2))
    late.flush()
    assert np.array_equal(late.metrics[0], now.metrics[0])
    with pytest.raises(kvtrim.Error, match=r"argument 'one_step_late': expected True or False, got 'yes'"):
        kvtrim.Eviction(caches, keep=KEEP, one_step_late="yes")


def test_one_step_late_is_refused_for_cuda_caches_before_the_device_is_touched(rng):
    # The check is Python's, on Cache.device, before any metric or carry is allocated: a CPU cache
    # that claims to be on CUDA is enough to see it without a GPU.
    cache = kvtrim.Cache(kvtrim.SnapKV(window=4, tokens=8), kvtrim.FP16(), "paged", (HQ, HKV, D), 1, 64)
    cache.device = "cuda"
    with pytest.raises(kvtrim.Error, match=r"^kvtrim.Eviction: argument 'one_step_late': expected False for caches on "
                                           r"cuda \(the metric one step late is CPU-only.*\), got True$"):
        kvtrim.Eviction([cache], keep=16, interval=4, one_step_late=True)


def test_one_step_late_is_refused_on_a_real_cuda_cache():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        cache = kvtrim.Cache(kvtrim.SnapKV(window=4, tokens=8), kvtrim.FP16(), "paged", (HQ, HKV, D), 1, 64,
                             device="cuda")
    except kvtrim.Error as e:  # a kvtrim built without CUDA
        pytest.skip(str(e))
    with pytest.raises(kvtrim.Error, match=r"argument 'one_step_late': expected False for caches on cuda"):
        kvtrim.Eviction([cache], keep=16, interval=4, one_step_late=True)
    eviction = kvtrim.Eviction([cache], keep=16, interval=4)  # immediate: the binding refuses a carry itself
    metric = eviction.metrics[0]
    carry = dict(carry_queries=np.zeros(HQ * D, np.float32), carry_normaliser=np.zeros(HQ * 2, np.float32),
                 carry_next=np.zeros(HKV, np.int64))
    queries = torch.zeros((1, HQ, D), dtype=torch.float16, device="cuda")
    with pytest.raises(kvtrim.Error, match=r"^kvtrim.Eviction.attend: argument 'carry': expected a cpu cache"):
        kvtrim._kvtrim._eviction_attend(cache._impl, queries, torch.empty_like(queries), metric, eviction._metric,
                                        **carry)
