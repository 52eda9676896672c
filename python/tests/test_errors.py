"""Errors: kvtrim::error arrives as kvtrim.Error (a ValueError) with the C++ message; the
binding names the argument and what came for ranks, dtypes and devices."""

import numpy as np
import pytest

import kvtrim
from oracle import random_layer


def small_cache(press=None, codec=None, layout="contiguous", capacity=32):
    return kvtrim.Cache(press or kvtrim.StreamingLLM(sinks=4, tokens=16), codec or kvtrim.FP16(), layout, (4, 2, 16), 1, capacity)


def test_error_is_a_value_error():
    assert issubclass(kvtrim.Error, ValueError)


def test_wrong_shape_names_the_argument_with_kvtrims_message(rng):
    cache = small_cache()
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::compress: argument 'values': expected shape \[1, 2, 64, 16\], got \[1, 2, 63, 16\]"):
        cache.compress(keys, values[:, :, :63])
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::compress: argument 'keys': expected shape \[1, 2, \*, 16\], got \[1, 3, 64, 16\]"):
        cache.compress(np.zeros((1, 3, 64, 16), np.float32), np.zeros((1, 3, 64, 16), np.float32))


def test_wrong_rank_dtype_and_contiguity(rng):
    cache = small_cache()
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.compress: argument 'keys': expected a 4-d array \[batch, kv_heads, tokens, head_dim\], got float32 \[2, 64, 16\] on cpu"):
        cache.compress(keys[0], values)
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected float32, float16 or bfloat16 elements, got float64 \[1, 2, 64, 16\] on cpu"):
        cache.compress(keys.astype(np.float64), values)
    with pytest.raises(kvtrim.Error, match=r"argument 'values': expected float32, float16 or bfloat16 elements, got int32"):
        cache.compress(keys, values.astype(np.int32))
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected a contiguous last axis \(stride 1\), got stride 2"):
        wide = np.repeat(keys, 2, axis=3)
        cache.compress(wide[..., ::2], values)
    cache.compress(keys, values)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'queries': expected a 3-d array "
                                           r"\[batch, q_heads, head_dim\] or \[batch, q_heads, new_tokens, head_dim\]"):
        cache.attend(np.zeros((1, 4, 16, 1, 1), np.float32))  # [B, H_q, L, D] is multi-query attend (test_speculative.py)
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::attend: argument 'out': expected shape \[1, 4, 16\], got \[1, 4, 8\]"):
        cache.attend(np.zeros((1, 4, 16), np.float32), out=np.zeros((1, 4, 8), np.float32))
    with pytest.raises(kvtrim.Error, match=r"argument 'out': expected a 3-d float32 array on the cpu, got float16"):
        cache.attend(np.zeros((1, 4, 16), np.float32), out=np.zeros((1, 4, 16), np.float16))


def test_full_cache_is_an_error(rng):
    cache = small_cache(capacity=16)
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    cache.compress(keys, values)
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::append: argument 'new_keys': expected at most 0 tokens \(capacity 16, holding 16\), got 1 tokens"):
        cache.append(keys[:, :, :1], values[:, :, :1])


def test_budget_larger_than_capacity(rng):
    cache = small_cache(press=kvtrim.StreamingLLM(tokens=40), capacity=32)
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    with pytest.raises(kvtrim.Error, match=r"argument 'config.budget.keep': expected at most the cache capacity = 32 tokens per head, got 40 tokens"):
        cache.compress(keys, values)


def test_snapkv_needs_window_queries(rng):
    cache = small_cache(press=kvtrim.SnapKV(window=8, compression_ratio=0.5))
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    with pytest.raises(kvtrim.Error, match=r"argument 'window_queries': expected the last prefill queries \[1, 4, w, 16\] \(snapkv scores with them\), got None"):
        cache.compress(keys, values)
    with pytest.raises(kvtrim.Error, match=r"argument 'window_queries': expected at least config.score.window = 8 observed queries, got 4 queries"):
        cache.compress(keys, values, np.zeros((1, 4, 4, 16), np.float32))


def test_scheme_not_in_the_list():
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache: argument 'scheme': expected one of the compiled schemes.*got device=cpu layout=contiguous scorer=snapkv budget=adaptive codec=fp16"):
        small_cache(press=kvtrim.AdaKV(kvtrim.SnapKV(compression_ratio=0.5)))
    # On CUDA: KIVI with H2O is not in the CUDA list (a build with CUDA), or there is no CUDA list at all.
    expected = (r"int8, int4, fp8 and layered<int4> are compiled with StreamingLLM, SnapKV"
                if kvtrim.has_cuda else r"expected a CPU scheme: this kvtrim was built without CUDA")
    with pytest.raises(kvtrim.Error, match=expected + r".*got device=cuda layout=flat scorer=h2o budget=uniform codec=int8"):
        kvtrim.Cache(kvtrim.H2O(), kvtrim.KIVI(), "flat", (4, 2, 16), 1, 64, device="cuda:0")


def test_python_side_arguments():
    with pytest.raises(kvtrim.Error, match=r"argument 'compression_ratio': expected a compression ratio in \[0, 1\)"):
        kvtrim.SnapKV(compression_ratio=1.0)
    with pytest.raises(kvtrim.Error, match=r"argument 'tokens': expected a token budget of at least 1, got 0"):
        kvtrim.KeyNorm(tokens=0)
    with pytest.raises(kvtrim.Error, match=r"argument 'bits': expected 8 or 4, got 2"):
        kvtrim.KIVI(bits=2)
    with pytest.raises(kvtrim.Error, match=r"argument 'scales': expected 'head_amax' or 'fixed', got 'tensor'"):
        kvtrim.FP8(scales="tensor")
    with pytest.raises(kvtrim.Error, match=r"argument 'rank': expected at least 1 or None, got 0"):
        kvtrim.LowRank(rank=0)
    with pytest.raises(kvtrim.Error, match=r"argument 'inner': expected KIVI\(bits=8\) or KIVI\(bits=4\)"):
        kvtrim.Layered(kvtrim.FP16())
    with pytest.raises(kvtrim.Error, match=r"argument 'layout': expected one of 'contiguous', 'flat', 'paged', got 'ragged'"):
        small_cache(layout="ragged")
    with pytest.raises(kvtrim.Error, match=r"argument 'shape': expected \(q_heads, kv_heads, head_dim\)"):
        kvtrim.Cache(kvtrim.StreamingLLM(), kvtrim.FP16(), "contiguous", (4, 2), 1, 16)
    with pytest.raises(kvtrim.Error, match=r"argument 'inner': expected a scorer press"):
        kvtrim.AdaKV(kvtrim.AdaKV(kvtrim.SnapKV()))
    with pytest.raises(kvtrim.Error, match=r"kvtrim::layout::contiguous::view::bytes: argument 'shape.q_heads': expected a multiple of kv_heads = 2, got 3"):
        kvtrim.Cache(kvtrim.StreamingLLM(), kvtrim.FP16(), "contiguous", (3, 2, 16), 1, 16)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Settings: argument 'pooling': expected 'avg' or 'max', got 'mean'"):
        small_cache(press=kvtrim.SnapKV(pooling="mean"))


def test_kept_and_positions_report_the_selection(rng):
    cache = small_cache()
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.kept: argument 'cache': expected a cache that was compressed, got no compress yet"):
        cache.kept()
    assert len(cache.positions()) == 0
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    cache.compress(keys, values)
    offsets, tokens = cache.kept()
    want = [0, 1, 2, 3] + list(range(52, 64))
    assert list(offsets) == [0, 16, 32] and list(tokens) == want * 2
    cache.append(keys[:, :, :2], values[:, :, :2])
    assert list(cache.positions()) == (want + [64, 65]) * 2


def test_cpu_cache_rejects_nothing_on_other_devices_it_cannot_see():
    # A CPU cache names the device it wants (arrays on cuda are checked where torch is present: test_torch.py).
    cache = small_cache()
    assert cache.device == "cpu" and cache.codec.name == "fp16"


def test_edge_cases(rng):
    cache = small_cache()
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected at least one token, got 0 tokens"):
        cache.compress(keys[:, :, :0], values[:, :, :0])
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected a NumPy array, torch tensor or CuPy array \(DLPack\), got list"):
        cache.compress(keys.tolist(), values)
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected shape \[1, 2, \*, 16\], got \[2, 2, 64, 16\]"):
        cache.compress(np.concatenate([keys, keys]), np.concatenate([values, values]))
    cache.compress(keys, values)  # a failed call leaves the cache usable
    assert list(cache.head_lengths()) == [16, 16]
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.read: argument 'h': expected a kv head in \[0, 2\), got 2"):
        cache.read(0, 2)


def test_external_scores_are_checked(rng):
    keys, values, _ = random_layer(rng, 1, 4, 2, 64, 16)
    cache = kvtrim.Cache(kvtrim.ExternalScores(compression_ratio=0.5), kvtrim.FP16(), "flat", (4, 2, 16), 1, 256)
    with pytest.raises(kvtrim.Error, match=r"argument 'scores': expected the caller's scores \[1, 2, tokens\] \(ExternalScores\), got None"):
        cache.compress(keys, values)
    with pytest.raises(kvtrim.Error, match=r"argument 'scores': expected a 3-d float32 array on the cpu, got float16 \[1, 2, 64\] on cpu"):
        cache.compress(keys, values, scores=np.zeros((1, 2, 64), np.float16))
    with pytest.raises(kvtrim.Error, match=r"config.score.scores.*\[1, 2, 64\]"):
        cache.compress(keys, values, scores=np.zeros((1, 2, 63), np.float32))
    with pytest.raises(kvtrim.Error, match=r"no compress yet"):
        cache.kept()  # a refused compress leaves the cache as it was


def held(cache):
    rows = [cache.read(0, h) for h in range(2)]
    return (cache.head_lengths().tolist(), cache.positions().tolist(), [(k.tobytes(), v.tobytes()) for k, v in rows])


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
@pytest.mark.parametrize("check", ["sync", "deferred"])
def test_a_non_finite_input_is_refused_and_the_cache_kept(rng, layout, check):
    # The CPU refuses at once whatever `check` says (it applies to device caches' status words); a
    # refused call leaves every held row, position and the kept selection as they were.
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, tokens=16), kvtrim.FP16(), layout, (4, 2, 16), 1, 96, check=check)
    keys, values, _ = random_layer(rng, 1, 4, 2, 40, 16)
    cache.compress(keys, values)
    before, kept = held(cache), cache.kept()
    bad = keys.copy()
    bad[0, 1, 38, 5] = np.nan
    with pytest.raises(kvtrim.Error, match=r"^kvtrim::scheme::compress: argument 'keys': expected finite values \(NaN and "
                                           r"Inf are refused for every codec\), got nan at sequence 0, kv head 1, token 38, channel 5$"):
        cache.compress(bad, values)
    with pytest.raises(kvtrim.Error, match=r"kvtrim::scheme::append: argument 'new_keys': expected finite values"):
        cache.append(bad[:, :, 37:39], values[:, :, 37:39])
    cache.check_status()  # nothing recorded on a CPU cache
    assert held(cache) == before
    assert all(np.array_equal(a, b) for a, b in zip(cache.kept(), kept))
    cache.append(keys[:, :, :2], values[:, :, :2])  # the next good call works
    assert cache.head_lengths().tolist() == [18, 18]


def test_check_names_its_choices():
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Settings: argument 'check': expected 'sync' or 'deferred', got 'never'"):
        small_cache().__class__(kvtrim.StreamingLLM(tokens=4), kvtrim.FP16(), "paged", (4, 2, 16), 1, 32, check="never")


@pytest.mark.parametrize("layout", ["flat", "paged"])
def test_adakv_paper_form_over_budget_is_refused_and_the_cache_kept(rng, layout):
    # The CPU half of test_cuda.py's device test: Ada-KV's paper form refuses a head whose protected
    # (+inf) tokens exceed the per-head budget, naming it, and the refused compress changes nothing.
    press = kvtrim.AdaKV(kvtrim.ExternalScores(tokens=4), alpha=0.2, kvpress_compatible=False)
    cache = kvtrim.Cache(press, kvtrim.FP16(), layout, (4, 2, 16), 1, 96)
    keys, values, _ = random_layer(rng, 1, 4, 2, 40, 16)
    scores = rng.standard_normal((1, 2, 40)).astype(np.float32)
    cache.compress(keys, values, scores=scores)
    before, kept = held(cache), cache.kept()
    over = scores.copy()
    over[0, 1, 1::5] = np.inf  # 8 protected tokens in kv head 1, over its budget of 4
    with pytest.raises(kvtrim.Error, match=r"^kvtrim::budget::adaptive: argument 'config.budget.keep': expected a per-head "
                                           r"budget of at least the 8 tokens the scorer protects \(scored \+inf\) in kv "
                                           r"head 1, got 4 tokens$"):
        cache.compress(keys, values, scores=over)
    assert held(cache) == before
    assert all(np.array_equal(a, b) for a, b in zip(cache.kept(), kept))


def test_given_normalisers_are_checked(rng):
    keys, values, queries = random_layer(rng, 1, 4, 2, 64, 16)
    cache = small_cache(press=kvtrim.SnapKV(window=8, compression_ratio=0.5))
    with pytest.raises(kvtrim.Error, match=r"argument 'config.score.lse': expected normalisers of extents \[1, 4, 64\]"):
        cache.compress(keys, values, queries, lse=np.zeros((1, 4, 8), np.float32))
    streaming = small_cache(press=kvtrim.StreamingLLM(tokens=16))
    with pytest.raises(kvtrim.Error, match=r"argument 'lse': expected None: only SnapKV and H2O take the prefill's softmax normalisers"):
        streaming.compress(keys, values, lse=np.zeros((1, 4, 64), np.float32))
