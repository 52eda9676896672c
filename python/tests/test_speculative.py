"""Speculative decoding from Python on the CPU: multi-query attend [B, H_q, L, D] and Cache.truncate.

Truncate (kvtrim::scheme::truncate, docs/composition.md §8): after append(drafts) and
truncate(drop), sequence b holds what it would hold had only its first n − drop[b] drafts been
appended. The reference is a cache of that one sequence (batch 1) that appended exactly those: the
CPU reference handles every (sequence, head) on its own, so lengths, positions, stored rows
(read(), dequantized) and decode attention must be equal bit for bit — after the truncation, and
after one more append (the verifier's token), which checks that positions and the codec's state
(KIVI's filling group, fp8's scales, low-rank's pending tokens, layered's recent rows) were rolled
back, not only the lengths. A refused truncation (negative, past a head's length, past what the
codec can forget, a malformed drop) raises kvtrim.Error and leaves every one of those unchanged.

Multi-query attend: query row i of [B, H_q, L, D] sees the head's first n − L + 1 + i tokens
(causal over the last L, which are the new tokens). Oracle: oracle.attention in float64 over
exactly those rows of read() (what attention reads), with oracle.attention_bound (storage roundoff
0: read() returns the stored values themselves). L = 1 is the [B, H_q, D] call, bit for bit.
"""

import numpy as np
import pytest

import kvtrim
from oracle import attention, attention_bound, positions_by_head

B, HQ, HKV, D, T, KEEP, DRAFTS = 2, 4, 2, 32, 48, 24, 4

# Every codec each layout compiles with StreamingLLM on the CPU (registry_cpu*.cpp).
CODECS = {
    "fp16": kvtrim.FP16, "bf16": kvtrim.BF16, "fp32": kvtrim.FP32, "int8": lambda: kvtrim.KIVI(bits=8),
    "int4": lambda: kvtrim.KIVI(bits=4), "fp8": kvtrim.FP8,
    # A ring of recent fp16 rows that the drafts do not overflow (test_layered_ring_... for one they do).
    "layered<int8>": lambda: kvtrim.Layered(kvtrim.KIVI(bits=8), sinks=4, recent=64),
    "layered<int4>": lambda: kvtrim.Layered(kvtrim.KIVI(bits=4), sinks=4, recent=64),
    "low_rank": lambda: kvtrim.LowRank(rank=8),
    "low_rank<profile>": lambda: kvtrim.LowRank(rank=8, source="profile"),
}
LAYOUT_CODECS = {
    "contiguous": ["fp16", "bf16", "fp32", "int8"],
    "flat": list(CODECS),
    "paged": ["fp16", "bf16", "fp32", "int8", "int4", "fp8", "layered<int4>"],
}
CASES = [(layout, codec) for layout, codecs in LAYOUT_CODECS.items() for codec in codecs]


def profile_bases(seed, rank=8):
    """Random orthonormal bases [H_kv, D, rank] (QR of Gaussian matrices), keys and values."""
    rng = np.random.default_rng(seed)
    return tuple(np.stack([np.linalg.qr(rng.standard_normal((D, rank)))[0] for _ in range(HKV)]).astype(np.float32)
                 for _ in range(2))


def make_cache(layout, codec, batch, capacity=None):
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, tokens=KEEP), CODECS[codec](), layout, (HQ, HKV, D), batch,
                         capacity or (KEEP + 4 * DRAFTS if layout == "contiguous" else batch * HKV * (KEEP + 64)),
                         page_size=8)
    if codec == "low_rank<profile>":
        cache.set_basis(*profile_bases(3))
    return cache


def inputs(seed, tokens=T, drafts=DRAFTS):
    rng = np.random.default_rng(seed)
    keys, values = rng.standard_normal((2, B, HKV, tokens, D)).astype(np.float32)
    new_keys, new_values = rng.standard_normal((2, B, HKV, drafts + 1, D)).astype(np.float32)
    queries = rng.standard_normal((B, HQ, drafts + 1, D)).astype(np.float32)
    return keys, values, new_keys, new_values, queries


def state(cache, b=None):
    """Everything a truncation may change, for sequence b (all when None)."""
    batch = cache._impl.batch
    sequences = range(batch) if b is None else [b]
    lengths = cache.head_lengths().reshape(batch, HKV)
    positions = positions_by_head(cache)
    return {
        "lengths": [list(lengths[s]) for s in sequences],
        "positions": [positions[s * HKV + h] for s in sequences for h in range(HKV)],
        "rows": [cache.read(s, h) for s in sequences for h in range(HKV)],
    }


def assert_same_state(a, b):
    assert a["lengths"] == b["lengths"] and a["positions"] == b["positions"]
    for (ak, av), (bk, bv) in zip(a["rows"], b["rows"]):
        assert np.array_equal(ak, bk) and np.array_equal(av, bv)


def attend_all(cache, queries):
    """One query per sequence [B, H_q, D] and two rows per sequence [B, H_q, 2, D]."""
    return cache.attend(np.ascontiguousarray(queries[:, :, 0])), cache.attend(np.ascontiguousarray(queries[:, :, :2]))


@pytest.mark.parametrize("layout,codec", CASES, ids=lambda x: str(x))
def test_truncate_equals_appending_only_the_accepted_drafts(layout, codec):
    keys, values, new_keys, new_values, queries = inputs(11)
    drop = [1, 1] if layout == "contiguous" else [1, 3]  # contiguous holds one length: equal counts
    cache = make_cache(layout, codec, B)
    cache.compress(keys, values)
    cache.append(new_keys[:, :, :DRAFTS], new_values[:, :, :DRAFTS])
    cache.attend(queries[:, :, :DRAFTS])  # the verifier's multi-query pass over the drafts
    cache.truncate(drop)
    after_truncate = [state(cache, b) for b in range(B)]
    out = attend_all(cache, queries)
    # The verifier's token after the accepted ones: the same array for every sequence here, at
    # each sequence's own next position.
    cache.append(new_keys[:, :, DRAFTS:], new_values[:, :, DRAFTS:])
    after_append = [state(cache, b) for b in range(B)]
    out_after_append = attend_all(cache, queries)
    for b in range(B):
        accepted = DRAFTS - drop[b]
        ref = make_cache(layout, codec, 1)
        ref.compress(keys[b:b + 1], values[b:b + 1])
        ref.append(new_keys[b:b + 1, :, :accepted], new_values[b:b + 1, :, :accepted])
        assert_same_state(after_truncate[b], state(ref))
        for got, want in zip(out, attend_all(ref, queries[b:b + 1])):
            assert np.array_equal(got[b:b + 1], want), f"sequence {b}"
        ref.append(new_keys[b:b + 1, :, DRAFTS:], new_values[b:b + 1, :, DRAFTS:])
        assert_same_state(after_append[b], state(ref))
        for got, want in zip(out_after_append, attend_all(ref, queries[b:b + 1])):
            assert np.array_equal(got[b:b + 1], want), f"sequence {b} after the next append"
    assert list(cache.head_lengths()) == [KEEP + DRAFTS - drop[b] + 1 for b in range(B) for _ in range(HKV)]


def test_layered_ring_after_truncate_is_the_documented_one():
    # Layered with a full ring of 8 recent fp16 rows: each draft pushed the ring's oldest token into
    # KIVI, and truncate cannot bring its fp16 row back (codec/layered.hpp drop_newest): until drop
    # more tokens arrive the truncated cache reads those tokens through KIVI, and otherwise equals the
    # reference; from then on, both bit for bit.
    keys, values, new_keys, new_values, _ = inputs(19, drafts=8)
    codec = lambda: kvtrim.Layered(kvtrim.KIVI(bits=8), sinks=4, recent=8)  # noqa: E731
    press = kvtrim.StreamingLLM(sinks=4, tokens=KEEP)
    cache = kvtrim.Cache(press, codec(), "flat", (HQ, HKV, D), 1, 512)
    ref = kvtrim.Cache(press, codec(), "flat", (HQ, HKV, D), 1, 512)
    inner = kvtrim.Cache(press, kvtrim.KIVI(bits=8), "flat", (HQ, HKV, D), 1, 512)  # what KIVI alone stores
    for c in (cache, ref, inner):
        c.compress(keys[:1], values[:1])
    cache.append(new_keys[:1, :, :3], new_values[:1, :, :3])
    cache.truncate(2)
    for c in (ref, inner):
        c.append(new_keys[:1, :, :1], new_values[:1, :, :1])
    got, want, quantized = state(cache), state(ref), state(inner)
    assert got["lengths"] == want["lengths"] and got["positions"] == want["positions"]
    # Ring rows of the reference: the 8 newest tokens (KEEP - 7 .. KEEP). The two drafts pushed out
    # tokens KEEP - 7 and KEEP - 6 in the truncated cache: KIVI's values there, fp16 elsewhere.
    pushed = [KEEP - 7, KEEP - 6]
    for (gk, gv), (wk, wv), (qk, qv) in zip(got["rows"], want["rows"], quantized["rows"]):
        others = np.setdiff1d(np.arange(len(gk)), pushed)
        assert np.array_equal(gk[others], wk[others]) and np.array_equal(gv[others], wv[others])
        assert np.array_equal(gk[pushed], qk[pushed]) and np.array_equal(gv[pushed], qv[pushed])
        assert not np.array_equal(gv[pushed], wv[pushed])  # fp16 rows in the reference, KIVI codes here
    more_keys, more_values = new_keys[:1, :, 4:6], new_values[:1, :, 4:6]
    cache.append(more_keys, more_values)
    ref.append(more_keys, more_values)
    assert_same_state(state(cache), state(ref))


def test_truncate_of_a_whole_append_restores_the_cache():
    keys, values, new_keys, new_values, queries = inputs(12)
    for layout in ("contiguous", "flat", "paged"):
        cache = make_cache(layout, "fp16", B)
        cache.compress(keys, values)
        before, out = state(cache), cache.attend(queries[:, :, 0].copy())
        cache.append(new_keys[:, :, :DRAFTS], new_values[:, :, :DRAFTS])
        cache.truncate(DRAFTS)
        assert_same_state(state(cache), before)
        assert np.array_equal(cache.attend(queries[:, :, 0].copy()), out)
        cache.truncate(0)  # nothing to drop: a no-op
        assert_same_state(state(cache), before)


def drop_forms():
    forms = [("int", 2), ("list", [2, 2]), ("tuple", (2, 2)), ("numpy int64", np.array([2, 2])),
             ("numpy int32 strided", np.array([2, 9, 2, 9], dtype=np.int32)[::2]),
             ("numpy uint8", np.array([2, 2], dtype=np.uint8)), ("numpy scalar", np.int64(2))]
    try:
        import torch

        forms.append(("torch int32", torch.tensor([2, 2], dtype=torch.int32)))
    except ImportError:
        pass
    return forms


@pytest.mark.parametrize("name,drop", drop_forms(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_form_of_drop_gives_the_same_cache(name, drop):
    keys, values, new_keys, new_values, _ = inputs(13)
    results = []
    for given in (np.array([2, 2], dtype=np.int32), drop):
        cache = make_cache("paged", "int8", B)
        cache.compress(keys, values)
        cache.append(new_keys[:, :, :DRAFTS], new_values[:, :, :DRAFTS])
        cache.truncate(given)
        results.append(state(cache))
    assert results[0]["lengths"] == [[KEEP + DRAFTS - 2] * HKV] * B
    assert_same_state(results[0], results[1])


def hostile_drops(layout):
    cases = [
        ("negative", -1, r"kvtrim::scheme::truncate: argument 'drop': expected a count ≥ 0.*got -1 for sequence 0"),
        ("negative in a list", [0, -2], r"argument 'drop': expected a count ≥ 0.*got -2 for sequence 1"),
        ("past the head's length", KEEP + DRAFTS + 1, r"kvtrim::scheme::truncate: argument 'drop'"),
        ("too few counts", [1], r"kvtrim.Cache.truncate: argument 'drop': expected an int32 array \[2\].*got int32 \[1\]"),
        ("too many counts", np.ones(3, np.int32), r"expected an int32 array \[2\].*got int32 \[3\]"),
        ("2-d", np.ones((2, 1), np.int32), r"kvtrim.Cache.truncate: argument 'drop': expected a 1-d array"),
        ("float array", np.ones(2, np.float32), r"argument 'drop': expected integer counts \[2\], got float32"),
        ("float in a list", [1, 1.5], r"argument 'drop': expected 2 int counts"),
        ("bool", True, r"argument 'drop': expected an int or \[2\] int32 counts, got True"),
        ("past int32", 2 ** 31, r"argument 'drop': expected counts that fit in int32"),
        ("numpy past int32", np.array([2 ** 40, 0]), r"argument 'drop': expected counts that fit in int32"),
        ("string", "1", r"argument 'drop': expected an int, a list of ints or an int32 array \[2\], got str"),
    ]
    if layout == "contiguous":
        cases.append(("unequal on contiguous", [1, 2], r"the same count for every sequence \(layout::contiguous"))
    return cases


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
def test_hostile_drops_raise_and_leave_the_cache_unchanged(layout):
    keys, values, new_keys, new_values, queries = inputs(14)
    cache = make_cache(layout, "int8", B)
    cache.compress(keys, values)
    cache.append(new_keys[:, :, :DRAFTS], new_values[:, :, :DRAFTS])
    before, out = state(cache), attend_all(cache, queries)
    for name, drop, message in hostile_drops(layout):
        with pytest.raises(kvtrim.Error, match=message):
            cache.truncate(drop)
        assert_same_state(state(cache), before)
        for got, want in zip(attend_all(cache, queries), out):
            assert np.array_equal(got, want), name
    cache.truncate(1)  # and the cache still works
    assert list(cache.head_lengths()) == [KEEP + DRAFTS - 1] * (B * HKV)


def test_truncate_past_kivis_fp16_group_is_refused_and_changes_nothing():
    # KIVI keys wait in an fp16 residual group of 32 tokens and are quantized when it fills: 30 kept
    # + 4 drafts seal a group, leaving 2 in the residual group, which is all truncate can forget exactly.
    keys, values, new_keys, new_values, queries = inputs(15)
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, tokens=30), kvtrim.KIVI(bits=8), "flat", (HQ, HKV, D), B, 512)
    cache.compress(keys, values)
    cache.append(new_keys[:, :, :DRAFTS], new_values[:, :, :DRAFTS])
    before, out = state(cache), attend_all(cache, queries)
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::truncate: argument 'drop'.*2"):
        cache.truncate([0, 3])
    assert_same_state(state(cache), before)
    for got, want in zip(attend_all(cache, queries), out):
        assert np.array_equal(got, want)
    cache.truncate([2, 0])  # within the residual group: allowed
    assert list(cache.head_lengths()) == [32, 32, 34, 34]


def test_truncate_past_low_ranks_last_refresh_is_refused():
    # Sequence bases grow every update_freq appended tokens; only the tokens since the last refresh
    # can be forgotten exactly (the basis already absorbed the earlier ones).
    keys, values, new_keys, new_values, _ = inputs(16, drafts=6)
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, tokens=KEEP), kvtrim.LowRank(rank=8, update_freq=4), "flat",
                         (HQ, HKV, D), B, 512)
    cache.compress(keys, values)
    cache.append(new_keys[:, :, :6], new_values[:, :, :6])  # a refresh after 4, 2 pending
    before = state(cache)
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::truncate: argument 'drop'"):
        cache.truncate(3)
    assert_same_state(state(cache), before)
    cache.truncate(2)
    assert list(cache.head_lengths()) == [KEEP + 4] * (B * HKV)


# ---- multi-query attend ----------------------------------------------------------------------


def causal_oracle(cache, queries):
    """float64 attention of queries [B, H_q, L, D]: row i over the first n − L + 1 + i rows of read()."""
    batch, _, rows, _ = queries.shape
    out = np.empty(queries.shape)
    bound = np.empty(queries.shape[:3] + (1,))
    for i in range(rows):
        visible = [[None] * HKV for _ in range(batch)], [[None] * HKV for _ in range(batch)]
        for b in range(batch):
            for h in range(HKV):
                k, v = cache.read(b, h)
                n = len(k) - rows + 1 + i
                visible[0][b][h], visible[1][b][h] = k[:n], v[:n]
        q = queries[:, :, i]
        out[:, :, i] = attention(q, *visible, HKV)
        bound[:, :, i] = attention_bound(q, *visible, HKV)
    return out, bound


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_multi_query_attend_matches_a_causal_oracle(layout, codec, rows):
    keys, values, new_keys, new_values, _ = inputs(17, drafts=8)
    queries = np.random.default_rng(rows).standard_normal((B, HQ, rows, D)).astype(np.float32)
    cache = make_cache(layout, codec, B, capacity=None if layout != "contiguous" else KEEP + 16)
    cache.compress(keys, values)
    cache.append(new_keys[:, :, :rows], new_values[:, :, :rows])
    out = cache.attend(queries)
    assert out.shape == (B, HQ, rows, D) and out.dtype == np.float32
    want, bound = causal_oracle(cache, queries)
    error = np.abs(out - want)
    assert np.all(error <= bound), f"worst {error.max():.3e} against a bound of {np.broadcast_to(bound, error.shape).flat[error.argmax()]:.3e}"
    # The last row sees every token: the one-query call, bit for bit.
    assert np.array_equal(out[:, :, -1], cache.attend(np.ascontiguousarray(queries[:, :, -1])))
    # Any strides: the same queries as a transposed view of a [B, L, H_q, D] array, and a given out.
    transposed = np.ascontiguousarray(queries.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    given = np.full_like(out, np.nan)
    assert cache.attend(transposed, out=given) is given
    assert np.array_equal(given, out)


def test_multi_query_attend_refuses_what_it_cannot_do():
    keys, values, new_keys, new_values, _ = inputs(18, drafts=8)
    cache = make_cache("paged", "fp16", B)
    cache.compress(keys, values)
    cache.append(new_keys[:, :, :2], new_values[:, :, :2])
    q = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'queries': expected \[2, 4, 32\] .* or "
                                           r"\[2, 4, L, 32\] with L = 1 to 8 .* got float32 \[2, 4, 9, 32\]"):
        cache.attend(q(B, HQ, 9, D))
    with pytest.raises(kvtrim.Error, match=r"with L = 1 to 8.*got float32 \[2, 4, 0, 32\]"):
        cache.attend(q(B, HQ, 0, D))
    with pytest.raises(kvtrim.Error, match=r"argument 'queries'.*got float32 \[2, 2, 4, 32\]"):
        cache.attend(q(B, 2, HQ, D))  # [B, L, H_q, D] (vLLM's order) is not taken for [B, H_q, L, D]
    with pytest.raises(kvtrim.Error, match=r"argument 'out': expected an array of the queries' shape \[2, 4, 2, 32\]"):
        cache.attend(q(B, HQ, 2, D), out=q(B, HQ, 3, D))
    with pytest.raises(kvtrim.Error, match=r"argument 'out': expected a 4-d array"):
        cache.attend(q(B, HQ, 2, D), out=q(B, HQ, D))
    with pytest.raises(kvtrim.Error, match=r"argument 'queries': expected a 3-d array"):
        cache.attend(q(B, HQ, 2, D, 1))
    short = make_cache("flat", "fp16", B)
    short.compress(keys[:, :, :3], values[:, :, :3])
    with pytest.raises(kvtrim.Error, match=r"at least 5"):
        short.attend(q(B, HQ, 5, D))  # a head holds fewer tokens than there are new ones
