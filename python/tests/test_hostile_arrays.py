"""Hostile arrays and settings at the Python boundary (CPU caches, NumPy only).

Whatever a caller hands kvtrim — byte-swapped, strided, read-only, unaligned, zero-size, wrongly typed
arrays; NaN/Inf; config values past int64 or of the wrong kind; calls from several threads — either
gives exactly the result of clean (contiguous, native-endian, aligned) copies of the same data, or
raises kvtrim.Error naming the call, the argument, what was expected and what came, and leaves the
cache (and any output array) as it was. Never a crash, a silent misread or a write into a read-only
array.
"""

import gc
import threading

import numpy as np
import pytest

import kvtrim

B, HQ, H, T, D, W = 2, 8, 2, 48, 16, 8


@pytest.fixture
def layer(rng):
    keys = rng.standard_normal((B, H, T, D)).astype(np.float32)
    values = rng.standard_normal((B, H, T, D)).astype(np.float32)
    window_queries = rng.standard_normal((B, HQ, W, D)).astype(np.float32)
    new_keys = rng.standard_normal((B, H, 3, D)).astype(np.float32)
    new_values = rng.standard_normal((B, H, 3, D)).astype(np.float32)
    queries = rng.standard_normal((B, HQ, D)).astype(np.float32)
    return keys, values, window_queries, new_keys, new_values, queries


def snapkv_cache(layout="flat", codec=None, capacity=256):
    return kvtrim.Cache(kvtrim.SnapKV(window=W, kernel=3, compression_ratio=0.5), codec or kvtrim.FP16(), layout,
                        (HQ, H, D), B, capacity)


def run(cache, keys, values, window_queries, new_keys, new_values, queries, out=None, lse=None, scores=None):
    """compress → append → attend; the attention output and every array the cache exposes."""
    cache.compress(keys, values, window_queries, lse=lse, scores=scores)
    cache.append(new_keys, new_values)
    result = cache.attend(queries, out=out)
    return result, snapshot(cache)


def snapshot(cache):
    """Everything a cache shows: lengths, positions, the last selection, every head's stored keys/values, stats."""
    state = {"lengths": cache.head_lengths().copy(), "positions": cache.positions().copy()}
    try:
        state["kept"] = tuple(x.copy() for x in cache.kept())
    except kvtrim.Error:
        state["kept"] = None
    batch, kv_heads = cache._impl.batch, cache.shape[1]
    state["heads"] = [tuple(x.copy() for x in cache.read(b, h)) for b in range(batch) for h in range(kv_heads)]
    stats = cache.stats()
    state["stats"] = (list(stats["kept"]), stats["total_bytes"])
    return state


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if key == "heads":
            assert len(x) == len(y)
            for (kx, vx), (ky, vy) in zip(x, y):
                assert np.array_equal(kx, ky) and np.array_equal(vx, vy)
        elif key == "kept":
            assert (x is None) == (y is None)
            if x is not None:
                assert all(np.array_equal(p, q) for p, q in zip(x, y))
        elif key == "stats":
            assert x == y
        else:
            assert np.array_equal(x, y), key


def unaligned(a):
    """a's values in memory one byte past an aligned address (a uint8 buffer reinterpreted)."""
    buffer = np.zeros(a.nbytes + 1, np.uint8)
    view = buffer[1:].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert not view.flags.aligned
    return view


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# ---- byte order ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [">f4", ">f2", "<f2"])
def test_byte_swapped_inputs_equal_native_copies(layer, order):
    # Big-endian float32 used to reach nanobind, which refused it with a TypeError naming neither the call nor
    # the argument; now every input (keys, values, window queries, lse, queries) is swapped or widened exactly.
    native = np.dtype(order).newbyteorder("=")
    clean = [x.astype(native).astype(np.float32) for x in layer]  # the values the other byte order holds
    lse = np.full((B, HQ, W), 6.0, np.float32)
    want, want_state = run(snapkv_cache(), *clean, lse=lse)
    got, got_state = run(snapkv_cache(), *[x.astype(order) for x in layer], lse=lse.astype(order))
    assert np.array_equal(got, want)
    assert_same_state(got_state, want_state)


def test_byte_swapped_scores_equal_native(layer, rng):
    keys, values, _, new_keys, new_values, queries = layer
    scores = rng.standard_normal((B, H, T)).astype(np.float32)

    def external():
        return kvtrim.Cache(kvtrim.AdaKV(kvtrim.ExternalScores(compression_ratio=0.5)), kvtrim.FP16(), "flat", (HQ, H, D), B, 256)

    want, want_state = run(external(), keys, values, None, new_keys, new_values, queries, scores=scores)
    got, got_state = run(external(), keys, values, None, new_keys, new_values, queries, scores=scores.astype(">f4"))
    assert np.array_equal(got, want)
    assert_same_state(got_state, want_state)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.compress: argument 'scores': expected a 3-d float32 array on "
                                           r"the cpu, got float16 \[2, 2, 48\] on cpu"):
        external().compress(keys, values, scores=scores.astype(">f2"))  # float32 only (not widened), either order


def test_byte_swapped_out_is_refused_and_not_written(layer):
    cache = snapkv_cache()
    run(cache, *layer)
    before = snapshot(cache)
    out = np.full((B, HQ, D), 7.0, ">f4")
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'out': expected an array in this host's "
                                           r"byte order \(kvtrim writes native floats into it\), got >f4 \[2, 8, 16\] on cpu"):
        cache.attend(layer[5], out=out)
    assert np.all(out == 7.0)
    assert_same_state(snapshot(cache), before)


# ---- read-only arrays ------------------------------------------------------------------------------


def test_read_only_inputs_are_read(layer):
    want, want_state = run(snapkv_cache(), *layer)
    got, got_state = run(snapkv_cache(), *[readonly(x) for x in layer])
    assert np.array_equal(got, want)
    assert_same_state(got_state, want_state)


@pytest.mark.parametrize("make", [
    lambda: readonly(np.full((B, HQ, D), 7.0, np.float32)),
    lambda: np.broadcast_to(np.full(D, 7.0, np.float32), (B, HQ, D)),  # read-only, zero strides
    lambda: readonly(np.full((B, HQ, 2, D), 7.0, np.float32)),         # multi-query form
])
def test_read_only_out_is_refused_and_not_written(layer, make):
    cache = snapkv_cache()
    run(cache, *layer)
    before = snapshot(cache)
    out = make()
    queries = np.zeros(out.shape, np.float32)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'out': expected a writable array \(kvtrim "
                                           r"writes the result into it\), got a read-only float32 \["):
        cache.attend(queries, out=out)
    assert np.all(out == 7.0)
    assert_same_state(snapshot(cache), before)


# ---- strides, order, alignment ------------------------------------------------------------------------


def test_strided_transposed_and_broadcast_inputs_equal_clean_copies(layer):
    keys, values, window_queries, new_keys, new_values, queries = layer
    want, want_state = run(snapkv_cache(), *layer)
    wide = np.zeros((B, 2 * H, 2 * T, D), np.float32)  # every other head and token: steps on two axes
    wide[:, ::2, ::2] = keys
    token_major = np.ascontiguousarray(values.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # HF's [B, T, H, D]
    batch_third = np.ascontiguousarray(window_queries.transpose(1, 2, 0, 3)).transpose(2, 0, 1, 3)
    out_rows = np.full((B, 2 * HQ, D), 7.0, np.float32)
    got, got_state = run(snapkv_cache(), wide[:, ::2, ::2], token_major, batch_third,
                         np.repeat(new_keys, 2, axis=2)[:, :, ::2], new_values, np.repeat(queries, 3, axis=1)[:, ::3],
                         out=out_rows[:, ::2])
    assert np.array_equal(got, want)
    assert np.all(out_rows[:, 1::2] == 7.0)  # only the strided out's own rows were written
    assert_same_state(got_state, want_state)
    # zero strides (np.broadcast_to): read as the materialised copy
    same_row = np.broadcast_to(queries[:, :1], queries.shape)
    cache = snapkv_cache()
    cache.compress(keys, values, window_queries)
    assert np.array_equal(cache.attend(same_row), cache.attend(np.ascontiguousarray(same_row)))


@pytest.mark.parametrize("bad,message", [
    (lambda k: np.asfortranarray(k), r"argument 'keys': expected a contiguous last axis \(stride 1\), got stride 192"),
    (lambda k: np.ascontiguousarray(k.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2),
     r"argument 'keys': expected a contiguous last axis \(stride 1\), got stride 48"),
    (lambda k: np.ascontiguousarray(k[:, :, ::-1])[:, :, ::-1],
     r"argument 'keys': expected non-negative strides, got strides \[1536, 768, -16, 1\]"),
])
def test_unreadable_layouts_are_refused(layer, bad, message):
    keys, values, window_queries, *_ = layer
    cache = snapkv_cache()
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::compress: " + message):
        cache.compress(bad(keys), values, window_queries)
    assert snapshot(cache)["lengths"].tolist() == [0] * (B * H)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_unaligned_arrays_equal_aligned(layer, dtype):
    # Inputs one byte off their elements' alignment are read through aligned copies (float16 is widened
    # into one anyway): C++ reads floats only at their alignment.
    clean = [x.astype(dtype).astype(np.float32) for x in layer]
    want, want_state = run(snapkv_cache(), *clean)
    got, got_state = run(snapkv_cache(), *[unaligned(x.astype(dtype)) for x in layer])
    assert np.array_equal(got, want)
    assert_same_state(got_state, want_state)


def test_unaligned_output_is_refused(layer):
    keys, values, window_queries, _, _, queries = layer
    cache = snapkv_cache()
    cache.compress(keys, values, window_queries)
    out = unaligned(np.zeros((B, HQ, D), np.float32))
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'out': expected an array aligned"):
        cache.attend(queries, out=out)
    assert np.array_equal(out, np.zeros_like(out))


# ---- wrong dtypes, ranks, sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,came", [(np.float64, "float64"), (np.int32, "int32"), (np.bool_, "bool8"),
                                        (np.complex64, "complex64"), (object, "object"), ("U1", "<U1"), ("V4", "|V4")])
def test_wrong_dtype_names_call_argument_and_dtype(layer, dtype, came):
    keys, values, window_queries, new_keys, new_values, queries = layer
    cache = snapkv_cache()
    cache.compress(keys, values, window_queries)
    before = snapshot(cache)
    bad = np.zeros((B, H, 2, D), dtype=dtype)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.append: argument 'values': expected float32, float16 or "
                                           r"bfloat16 elements, got " + came + r" \[2, 2, 2, 16\] on cpu"):
        cache.append(new_keys[:, :, :2], bad)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'queries': expected float32, float16 or "
                                           r"bfloat16 elements, got " + came):
        cache.attend(np.zeros((B, HQ, D), dtype=dtype))
    assert_same_state(snapshot(cache), before)


def test_not_arrays(layer):
    keys, values, window_queries, *_ = layer
    cache = snapkv_cache()
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.compress: argument 'keys': expected a NumPy array, torch "
                                           r"tensor or CuPy array \(DLPack\), got list"):
        cache.compress(keys.tolist(), values, window_queries)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.append: argument 'values': .*got float32"):
        cache.append(keys, np.float32(1.0))  # a NumPy scalar is no array
    external = kvtrim.Cache(kvtrim.ExternalScores(tokens=8), kvtrim.FP16(), "flat", (HQ, H, D), B, 256)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.compress: argument 'scores': expected a NumPy array, torch "
                                           r"tensor or CuPy array \(DLPack\), got list"):
        external.compress(keys, values, scores=np.zeros((B, H, T)).tolist())


@pytest.mark.parametrize("call,message", [
    (lambda c, k, v, q: c.compress(np.array(1.0, np.float32), v, q),
     r"kvtrim.Cache.compress: argument 'keys': expected a 4-d array \[batch, kv_heads, tokens, head_dim\], got float32 \[\] on cpu"),
    (lambda c, k, v, q: c.compress(k[0], v, q),
     r"kvtrim.Cache.compress: argument 'keys': expected a 4-d array .*got float32 \[2, 48, 16\] on cpu"),
    (lambda c, k, v, q: c.compress(k[:, :, :0], v[:, :, :0], q),
     r"kvtrim::scheme::compress: argument 'keys': expected at least one token, got 0 tokens"),
    (lambda c, k, v, q: c.compress(k[..., :0], v[..., :0], q),
     r"kvtrim::scheme::compress: argument 'keys': expected shape \[2, 2, \*, 16\], got \[2, 2, 48, 0\]"),
    (lambda c, k, v, q: c.compress(k[:0], v[:0], q),
     r"kvtrim::scheme::compress: argument 'keys': expected shape \[2, 2, \*, 16\], got \[0, 2, 48, 16\]"),
    (lambda c, k, v, q: c.compress(k, v, q[:, :, :0]),
     r"kvtrim::scheme::compress: argument 'window_queries': expected between 1 and 48 \(the prefill length\) queries, got 0"),
    (lambda c, k, v, q: c.append(k[:1, :, :2], v[:1, :, :2]),
     r"kvtrim::scheme::append: argument 'new_keys': expected shape \[2, 2, \*, 16\], got \[1, 2, 2, 16\]"),
    (lambda c, k, v, q: c.append(np.zeros((B, 3, 1, D), np.float32), np.zeros((B, 3, 1, D), np.float32)),
     r"kvtrim::scheme::append: argument 'new_keys': expected shape \[2, 2, \*, 16\], got \[2, 3, 1, 16\]"),
    (lambda c, k, v, q: c.append(k[:, :, :2], v[:, :, :3]),
     r"kvtrim::scheme::append: argument 'new_values': expected shape \[2, 2, 2, 16\], got \[2, 2, 3, 16\]"),
    (lambda c, k, v, q: c.append(k[:, :, :0], v[:, :, :0]),
     r"kvtrim::scheme::append: argument 'new_keys': expected at least one token, got 0 tokens"),
    (lambda c, k, v, q: c.attend(np.zeros((B, HQ // 2, D), np.float32)),
     r"kvtrim::scheme::attend: argument 'queries': expected shape \[2, 8, 16\], got \[2, 4, 16\]"),
    (lambda c, k, v, q: c.attend(np.zeros((0, HQ, D), np.float32)),
     r"kvtrim::scheme::attend: argument 'queries': expected shape \[2, 8, 16\], got \[0, 8, 16\]"),
    (lambda c, k, v, q: c.attend(np.zeros((B, HQ, 0, D), np.float32)),
     r"kvtrim.Cache.attend: argument 'queries': expected \[2, 8, 16\] \(one new token per sequence\) or \[2, 8, L, 16\] with L = 1 to 8"),
    (lambda c, k, v, q: c.attend(np.zeros((B, HQ, 9, D), np.float32)), r"with L = 1 to 8 new tokens per sequence"),
    (lambda c, k, v, q: c.attend(np.zeros((B, HQ, 2, D), np.float32), out=np.zeros((B, HQ, D), np.float32)),
     r"kvtrim.Cache.attend: argument 'out': expected a 4-d array of the queries' rank, got float32 \[2, 8, 16\]"),
    (lambda c, k, v, q: c.attend(np.zeros((B, HQ, D), np.float32), out=np.zeros((B, HQ, D), np.float64)),
     r"kvtrim.Cache.attend: argument 'out': expected float32, float16 or bfloat16 elements, got float64"),
])
def test_wrong_rank_and_size_leave_the_cache_as_it_was(layer, call, message):
    keys, values, window_queries, new_keys, new_values, _ = layer
    cache = snapkv_cache()
    cache.compress(keys, values, window_queries)
    cache.append(new_keys, new_values)
    before = snapshot(cache)
    with pytest.raises(kvtrim.Error, match=message):
        call(cache, keys, values, window_queries)
    assert_same_state(snapshot(cache), before)


# ---- NaN / Inf ------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,codec", [("contiguous", kvtrim.FP16()), ("flat", kvtrim.KIVI(bits=4, group=8)),
                                          ("paged", kvtrim.FP8()), ("flat", kvtrim.LowRank(rank=4, update_freq=2))])
@pytest.mark.parametrize("where", ["keys", "values", "window_queries", "new_keys", "new_values"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused_and_change_nothing(layer, layout, codec, where, bad):
    arrays = dict(zip(["keys", "values", "window_queries", "new_keys", "new_values", "queries"], [x.copy() for x in layer]))
    cache = snapkv_cache(layout, codec, capacity=256 if layout != "contiguous" else 64)
    cache.compress(arrays["keys"], arrays["values"], arrays["window_queries"])
    cache.append(arrays["new_keys"][:, :, :1], arrays["new_values"][:, :, :1])
    before = snapshot(cache)
    arrays[where][-1, -1, -1, -1] = bad  # the last element: read after every other check and write plan
    function, argument = (("compress", where) if where in ("keys", "values", "window_queries")
                          else ("append", where))
    head = "query head" if where == "window_queries" else "kv head"
    token = arrays[where].shape[2] - 1
    with pytest.raises(kvtrim.Error, match=fr"kvtrim::scheme::{function}: argument '{argument}': expected finite values "
                                           fr".*got {'nan' if bad != bad else ('inf' if bad > 0 else '-inf')} at sequence 1, "
                                           fr"{head} {arrays[where].shape[1] - 1}, token {token}, channel {D - 1}"):
        if function == "compress":
            cache.compress(arrays["keys"], arrays["values"], arrays["window_queries"])
        else:
            cache.append(arrays["new_keys"], arrays["new_values"])
    assert_same_state(snapshot(cache), before)


def test_non_finite_lse_rows_contribute_nothing(layer):
    # Documented (score/attention_mass.hpp): a NaN or ±Inf normaliser is not refused — the device could not
    # refuse it — and its row contributes nothing, so NaN, +Inf and -Inf select alike, and nothing is NaN.
    keys, values, window_queries, *_ = layer
    lse = np.full((B, HQ, W), 6.0, np.float32)
    kept = []
    for bad in (np.nan, np.inf, -np.inf):
        given = lse.copy()
        given[1, 3, 2] = bad
        cache = snapkv_cache()
        cache.compress(keys, values, window_queries, lse=given)
        kept.append(cache.kept())
        assert np.all(np.isfinite(cache.attend(layer[5])))
    for offsets, tokens in kept[1:]:
        assert np.array_equal(offsets, kept[0][0]) and np.array_equal(tokens, kept[0][1])


# ---- truncate's counts ------------------------------------------------------------------------------


def test_truncate_counts_of_every_kind(layer):
    keys, values, window_queries, new_keys, new_values, _ = layer

    def after(drop):
        cache = snapkv_cache()
        cache.compress(keys, values, window_queries)
        cache.append(new_keys, new_values)
        cache.truncate(drop)
        return snapshot(cache)

    want = after([2, 1])
    for drop in (np.array([2, 1], ">i4"), readonly(np.array([2, 1], np.int32)), np.array([2, 1], np.uint8),
                 np.array([0, 2, 0, 1], np.int32)[1::2], (np.int64(2), np.int16(1))):
        assert_same_state(after(drop), want)
    cache = snapkv_cache()
    cache.compress(keys, values, window_queries)
    before = snapshot(cache)
    for drop, message in [(np.array([1.0, 1.0]), r"expected integer counts \[2\], got float64 \[2\]"),
                          (True, r"expected an int or \[2\] int32 counts, got True"),
                          ([1, True], r"expected 2 int counts, got \[1, True\]"),
                          (2**40, r"expected counts that fit in int32, got 1099511627776"),
                          (np.array([2**40, 0], np.uint64), r"expected counts that fit in int32, got 0 \.\. 1099511627776"),
                          (1.0, r"expected an int, a list of ints or an int32 array \[2\], got float"),
                          ([1], r"expected an int32 array \[2\] \(one count per sequence\), got int32 \[1\] on cpu"),
                          (np.array(1), r"expected a 1-d array \[batch\] counts, got int32 \[\] on cpu"),
                          (-1, r"kvtrim::scheme::truncate: argument 'drop': expected a count ≥ 0"),
                          (10**6, r"kvtrim::scheme::truncate: argument 'drop': expected at most the 24 tokens")]:
        with pytest.raises(kvtrim.Error, match=r"argument 'drop': " + message.split("argument 'drop': ")[-1]):
            cache.truncate(drop)
        assert_same_state(snapshot(cache), before)


def test_byte_swapped_low_rank_bases_equal_native(layer, rng):
    bases = [np.linalg.qr(rng.standard_normal((H, D, 4)))[0].astype(np.float32) for _ in range(2)]

    def profile_cache(key_bases, value_bases):
        cache = snapkv_cache("flat", kvtrim.LowRank(rank=4, source="profile"))
        cache.set_basis(key_bases, value_bases)
        return cache

    want, want_state = run(profile_cache(*bases), *layer)
    got, got_state = run(profile_cache(*[b.astype(">f4") for b in bases]), *layer)
    assert np.array_equal(got, want)
    assert_same_state(got_state, want_state)
    cache = snapkv_cache("flat", kvtrim.LowRank(rank=4, source="profile"))
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.set_basis: argument 'value_bases': expected float32, float16 "
                                           r"or bfloat16 elements, got object \[2, 16, 4\] on cpu"):
        cache.set_basis(bases[0], bases[1].astype(object))


# ---- settings: budgets, knobs and sizes -----------------------------------------------------------------


@pytest.mark.parametrize("ratio", [float("nan"), float("inf"), -float("inf"), 1.0, 1.5, -0.1, True, "0.5", None])
def test_compression_ratio_outside_0_1_or_not_a_number(ratio):
    with pytest.raises(kvtrim.Error, match=r"kvtrim press: argument 'compression_ratio': expected a compression ratio "
                                           r"in \[0, 1\) \(kvpress's assertion\), got "):
        kvtrim.SnapKV(compression_ratio=ratio)


@pytest.mark.parametrize("tokens", [0, -1, 1.5, 16.0, True, "16", np.float64(16)])
def test_token_budget_must_be_a_positive_integer(tokens):
    with pytest.raises(kvtrim.Error, match=r"kvtrim press: argument 'tokens': expected a token budget of at least 1, got "):
        kvtrim.StreamingLLM(tokens=tokens)


def test_numpy_integers_are_integers(layer):
    # A budget or size computed with NumPy (np.int64) used to be refused ("expected a token budget of at
    # least 1, got np.int64(16)"); a float shape entry used to be truncated (16.5 → 16) without a word.
    every_query = np.repeat(layer[2], T // W, axis=2)  # H2O reads every prefill query
    layer = layer[:2] + (every_query,) + layer[3:]
    want, want_state = run(kvtrim.Cache(kvtrim.H2O(recent=8, tokens=16), kvtrim.KIVI(group=8), "flat", (HQ, H, D), B, 256),
                           *layer)
    press = kvtrim.H2O(recent=np.int32(8), tokens=np.int64(16))
    cache = kvtrim.Cache(press, kvtrim.KIVI(group=np.int64(8)), "flat", tuple(np.array([HQ, H, D])), np.int64(B),
                         np.int64(256))
    got, got_state = run(cache, *layer)
    assert np.array_equal(got, want)
    assert_same_state(got_state, want_state)
    kvtrim.LowRank(rank=np.int64(4), max_rank=np.int32(8))
    for shape in [(HQ, H, 16.5), (HQ, H, "16"), (HQ, H), (HQ, H, D, 1)]:
        with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache: argument 'shape': expected \(q_heads, kv_heads, head_dim\)"):
            kvtrim.Cache(kvtrim.StreamingLLM(tokens=16), kvtrim.FP16(), "flat", shape, B, 256)


@pytest.mark.parametrize("make,argument", [
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=2**63), kvtrim.FP16(), "flat", (HQ, H, D), B, 256), "tokens"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(sinks=2**63, tokens=8), kvtrim.FP16(), "flat", (HQ, H, D), B, 256), "sinks"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8, windows=[2**64]), kvtrim.FP16(), "flat", (HQ, H, D), B, 256),
     "windows"),
    (lambda: kvtrim.Cache(kvtrim.SnapKV(window=-2**70, compression_ratio=0.5), kvtrim.FP16(), "flat", (HQ, H, D), B, 256),
     "window"),
    (lambda: kvtrim.Cache(kvtrim.SnapKV(kernel="5", compression_ratio=0.5), kvtrim.FP16(), "flat", (HQ, H, D), B, 256),
     "kernel"),
    (lambda: kvtrim.Cache(kvtrim.AdaKV(kvtrim.SnapKV(compression_ratio=0.5), alpha="0.2"), kvtrim.FP16(), "flat",
                          (HQ, H, D), B, 256), "alpha"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "paged", (HQ, H, D), B, 256, page_size=2**63),
     "page_size"),
    (lambda: kvtrim.Cache(kvtrim.Pyramid(kvtrim.SnapKV(compression_ratio=0.5)), kvtrim.FP16(), "flat", (HQ, H, D), B, 256,
                          layer=2**63, layers=4), "layer"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.Layered(sinks=2**63), "flat", (HQ, H, D), B, 256), "sinks"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "flat", (HQ, H, D), 2**63, 256), "batch"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "flat", (HQ, H, D), B, 2**64), "capacity"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "flat", (HQ, H, D), 1.5, 256), "batch"),
    (lambda: kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "flat", (HQ, H, 2**63), B, 256), "shape"),
])
def test_knobs_that_settings_cannot_hold_name_the_argument(make, argument):
    # Used to be nanobind's TypeError "(): incompatible function arguments ... Settings, int".
    with pytest.raises(kvtrim.Error, match=fr"kvtrim.Cache: argument '{argument}': expected "):
        make()


@pytest.mark.parametrize("make,message", [
    (lambda: kvtrim.H2O(recent=-3, compression_ratio=0.5), r"kvtrim.H2O: argument 'recent': expected a recent window of "
                                                           r"at least 1 token \(an int\) or a fraction of the prompt"),
    (lambda: kvtrim.H2O(recent=0, compression_ratio=0.5), r"kvtrim.H2O: argument 'recent': .*got 0"),
    (lambda: kvtrim.H2O(recent=True, compression_ratio=0.5), r"kvtrim.H2O: argument 'recent': .*got True"),
    (lambda: kvtrim.H2O(recent="10%", compression_ratio=0.5), r"kvtrim.H2O: argument 'recent': .*got '10%'"),
    (lambda: kvtrim.KIVI(group=0), r"kvtrim.KIVI: argument 'group': expected a group of at least 1 token \(KIVI: 32\), got 0"),
    (lambda: kvtrim.KIVI(group=-1), r"kvtrim.KIVI: argument 'group': .*got -1"),
    (lambda: kvtrim.KIVI(group=8.0), r"kvtrim.KIVI: argument 'group': .*got 8.0"),
    (lambda: kvtrim.LowRank(rank=4.0), r"kvtrim.LowRank: argument 'rank': expected at least 1 or None, got 4.0"),
])
def test_knobs_checked_where_they_are_given(make, message):
    # H2O(recent=-3) or recent=0 used to fall back to the default 10 % window without a word; KIVI(group=0)
    # used to fail in the pool's size arithmetic ("argument 'pool.slots': ... got 256 + -1").
    with pytest.raises(kvtrim.Error, match=message):
        make()


def test_h2o_integer_recent_window_is_a_token_count(layer):
    keys, values, window_queries, *_ = layer

    def kept(recent):
        cache = kvtrim.Cache(kvtrim.H2O(recent=recent, tokens=16), kvtrim.FP16(), "flat", (HQ, H, D), B, 256)
        cache.compress(keys, values, np.repeat(window_queries, T // W, axis=2))  # H2O reads every prefill query
        return cache.kept()[1]

    assert np.array_equal(kept(np.int64(12)), kept(12))
    assert not np.array_equal(kept(12), kept(0.1))  # 12 tokens, not the default fraction


@pytest.mark.parametrize("arguments,message", [
    (dict(keep=32, interval=0), r"kvtrim.Eviction: argument 'interval': expected at least one decode step \(an int\), got 0"),
    (dict(keep=32, interval=16.5), r"argument 'interval': .*got 16.5"),
    (dict(keep=32, interval=True), r"argument 'interval': .*got True"),
    (dict(keep=2**63), r"kvtrim.Eviction: argument 'keep': expected an integer in \[-2\^63, 2\^63\), got 9223372036854775808"),
    (dict(keep=32, sinks=4.0), r"kvtrim.Eviction: argument 'sinks': expected an integer"),
    (dict(keep=32, alpha="0.2"), r"kvtrim.Eviction: argument 'alpha': expected a number, got '0.2'"),
])
def test_eviction_settings_are_checked_at_construction(arguments, message):
    # interval=0 used to build, then raise ZeroDivisionError from due(); the others nanobind's TypeError.
    cache = kvtrim.Cache(kvtrim.SnapKV(window=W, compression_ratio=0.5), kvtrim.FP16(), "paged", (HQ, H, D), B, 256)
    with pytest.raises(kvtrim.Error, match=message):
        kvtrim.Eviction([cache], **arguments)


def test_eviction_takes_numpy_integers_and_byte_swapped_arrays(layer):
    keys, values, window_queries, *_ = layer

    def steps(cast, **arguments):
        cache = kvtrim.Cache(kvtrim.SnapKV(window=W, compression_ratio=0.5), kvtrim.FP16(), "paged", (HQ, H, D), B, 256)
        cache.compress(keys, values, window_queries)
        eviction = kvtrim.Eviction([cache], **arguments)
        eviction.seed(0, cast(keys), cast(window_queries))
        out = eviction.attend(0, cast(window_queries[:, :, -1]))
        return out, eviction.metrics[0].copy(), eviction.due(16)

    want = steps(lambda x: x, keep=32, interval=16)
    got = steps(lambda x: x.astype(">f4"), keep=np.int64(32), interval=np.int32(16))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


# ---- threads and the garbage collector ---------------------------------------------------------------------


def _thread_run(count, body):
    failures = []

    def guarded(i):
        try:
            body(i)
        except BaseException as failure:  # noqa: BLE001 — reported by the main thread
            failures.append(failure)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def test_threads_on_distinct_caches_equal_sequential_results(rng):
    layers = [[rng.standard_normal(shape).astype(np.float32) for shape in
               [(B, H, T, D), (B, H, T, D), (B, HQ, W, D), (B, H, 3, D), (B, H, 3, D), (B, HQ, D)]] for _ in range(4)]
    codecs = [kvtrim.FP16(), kvtrim.KIVI(bits=4, group=8), kvtrim.FP8(), kvtrim.BF16()]
    want = [run(snapkv_cache("paged", codecs[i]), *layers[i]) for i in range(4)]
    got = [None] * 4

    def body(i):
        for _ in range(5):
            got[i] = run(snapkv_cache("paged", codecs[i]), *layers[i])

    _thread_run(4, body)
    for (w_out, w_state), (g_out, g_state) in zip(want, got):
        assert np.array_equal(g_out, w_out)
        assert_same_state(g_state, w_state)


def test_threads_on_one_cache_see_one_call_or_the_other(rng):
    # The calls release the GIL; without a lock per cache, an attend or kept() running while another thread's
    # compress rewrote the cache read a half-written cache, shared one scratch buffer, or found the selection
    # being replaced ("expected a cache that was compressed, got no compress yet").
    first = [rng.standard_normal(s).astype(np.float32) for s in [(B, H, T, D), (B, H, T, D), (B, HQ, W, D)]]
    second = [rng.standard_normal(s).astype(np.float32) for s in [(B, H, T, D), (B, H, T, D), (B, HQ, W, D)]]
    queries = rng.standard_normal((B, HQ, D)).astype(np.float32)
    cache = kvtrim.Cache(kvtrim.AdaKV(kvtrim.SnapKV(window=W, kernel=3, compression_ratio=0.5)), kvtrim.FP16(), "flat",
                         (HQ, H, D), B, B * H * T)
    outcomes = []
    for arrays in (first, second):
        cache.compress(*arrays)
        outcomes.append((cache.attend(queries), cache.kept(), cache.head_lengths().copy()))
    stop = threading.Event()

    def matches(index, value):
        return any(np.array_equal(value, outcome[index]) if index != 1 else
                   all(np.array_equal(a, b) for a, b in zip(value, outcome[1])) for outcome in outcomes)

    def body(i):
        if i == 0:
            for n in range(600):
                cache.compress(*(first if n % 2 else second))
            stop.set()
            return
        calls = 0
        while not stop.is_set() or calls < 5:  # some calls even if the writer finished first
            calls += 1
            if i == 1:
                assert matches(0, cache.attend(queries))
            elif i == 2:
                assert matches(1, cache.kept())
            else:
                assert matches(2, cache.head_lengths())
                cache.stats()

    _thread_run(4, body)


def test_inputs_collected_during_calls(layer):
    # Temporaries (the float16 → float32 widening, slices) are the only references to what a call reads;
    # a collector running on another thread while the GIL is released must not free them.
    want = run(snapkv_cache(), *[x.astype(np.float16).astype(np.float32) for x in layer])[0]
    stop = threading.Event()

    def body(i):
        if i == 0:
            while not stop.is_set():
                gc.collect()
            return
        try:
            for _ in range(10):
                cache = snapkv_cache()
                cache.compress(*(np.array(x, np.float16, copy=True) for x in layer[:3]))
                cache.append(*(np.array(x, np.float16, copy=True)[:, ::-1][:, ::-1] for x in layer[3:5]))
                assert np.array_equal(cache.attend(np.array(layer[5], np.float16, copy=True)), want)
        finally:
            stop.set()

    _thread_run(2, body)
