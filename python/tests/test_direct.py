"""The registry's type-erased path equals a direct, statically typed C++ call path bit for bit.

kvtrim._kvtrim._direct_* run compress → append → attend through a scheme named
in C++ (what a C++ caller writes: no registry, no Settings); kvtrim.Cache must
produce the same output bits and head lengths.
"""

import numpy as np
import pytest

import kvtrim
from kvtrim import _kvtrim
from oracle import random_layer


@pytest.mark.parametrize("sinks,keep,appended", [(4, 16, 0), (4, 16, 3), (0, 5, 1), (8, 64, 2)])
def test_streaming_contiguous_fp32_equals_direct_cpp(rng, sinks, keep, appended):
    batch, q_heads, kv_heads, tokens, dim = 2, 8, 2, 64, 32
    keys, values, _ = random_layer(rng, batch, q_heads, kv_heads, tokens, dim)
    new_k, new_v, _ = random_layer(rng, batch, q_heads, kv_heads, appended, dim)
    queries = rng.standard_normal((batch, q_heads, dim)).astype(np.float32)
    capacity = min(keep, tokens) + appended
    want_out, want_lengths = _kvtrim._direct_streaming(sinks, keep, keys, values, new_k, new_v, queries, q_heads, capacity)
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=sinks, tokens=keep), kvtrim.FP32(), "contiguous",
                         (q_heads, kv_heads, dim), batch, capacity)
    cache.compress(keys, values)
    if appended:
        cache.append(new_k, new_v)
    out = cache.attend(queries)
    assert np.array_equal(out.reshape(want_out.shape), want_out)
    assert np.array_equal(cache.head_lengths(), want_lengths)


@pytest.mark.parametrize("ratio,alpha,window,kernel,appended", [(0.5, 0.2, 8, 5, 0), (0.75, 0.2, 16, 7, 2), (0.3, 0.0, 4, 1, 1)])
def test_adakv_snapkv_flat_fp16_equals_direct_cpp(rng, ratio, alpha, window, kernel, appended):
    batch, q_heads, kv_heads, tokens, dim = 2, 8, 4, 96, 16
    keys, values, wq = random_layer(rng, batch, q_heads, kv_heads, tokens, dim, window=window)
    new_k, new_v, _ = random_layer(rng, batch, q_heads, kv_heads, appended, dim)
    queries = rng.standard_normal((batch, q_heads, dim)).astype(np.float32)
    slots = batch * kv_heads * (tokens + appended)
    want_out, want_lengths = _kvtrim._direct_adakv(ratio, alpha, window, kernel, keys, values, wq, new_k, new_v, queries,
                                                   q_heads, slots)
    press = kvtrim.AdaKV(kvtrim.SnapKV(window=window, kernel=kernel, compression_ratio=ratio), alpha=alpha)
    cache = kvtrim.Cache(press, kvtrim.FP16(), "flat", (q_heads, kv_heads, dim), batch, slots)
    cache.compress(keys, values, wq)
    if appended:
        cache.append(new_k, new_v)
    out = cache.attend(queries)
    assert np.array_equal(out.reshape(want_out.shape), want_out)
    assert np.array_equal(cache.head_lengths(), want_lengths)
