"""The codecs beyond fp16/bf16/fp32 against the inputs they were given: what Cache.read() returns is
within each codec's own derived error bound of the original keys and values (test_schemes.py checks
attention over those rows for every scheme; this checks the rows themselves).

Bounds (u16 = 2^-11, fp16's unit roundoff; u32 = 2^-24):
  KIVI b bits, zero points: x̂ = q·s + z with s = (max − min)/(2^b − 1) over the run (a key channel's
      group of G tokens, a value row), so |x − x̂| ≤ s/2, plus a few fp32 roundings of q·s + z
      (≤ 4·u32·max|x|). Keys wait in the fp16 residual window until their group is full and are
      quantized from there: their runs are those of fp16(x), and |x − fp16(x)| ≤ u16·|x| more.
  fp8 e4m3, one scale per head (amax/448): 3 mantissa bits, |x − x̂| ≤ 2^-4·|x| above the
      subnormals, whose half step is 2^-10·scale.
  low-rank, rank r of the T × D matrix M (keys or values): ‖M − M̂‖_F ≤ √(Σ_{i>r} σ_i²) (Eckart–Young,
      a basis from the SVD of exactly these rows) + the coefficients' fp16 rounding (≤ u16·‖M‖_F, the
      coefficients being an orthonormal projection) + the fp32 basis (2^-10·‖M‖_F, generous for an
      SVD of 64-row data). Pre-RoPE keys: RoPE rotates each row orthogonally, so the rotated
      rebuild is within the same bound of RoPE(K_pre).
  layered<C>: the first `sinks` and the newest `recent` tokens are fp16 rows (exact fp16 of the
      input); the others within C's bound.
"""

import numpy as np
import pytest

import kvtrim

B, HQ, HKV, T, D = 1, 4, 2, 96, 32
U16, U32 = 2.0 ** -11, 2.0 ** -24


def layer(rng, scale=1.0):
    keys = (scale * rng.standard_normal((B, HKV, T, D))).astype(np.float32)
    values = rng.standard_normal((B, HKV, T, D)).astype(np.float32)
    return keys, values


def keep_all(codec, keys, values, capacity=4 * T):
    cache = kvtrim.Cache(kvtrim.StreamingLLM(compression_ratio=0.0), codec, "flat", (HQ, HKV, D), B, capacity)
    cache.compress(keys, values)
    assert list(cache.head_lengths()) == [T] * HKV
    return cache


def kivi_bound(x, bits, group, keys):
    """|x − x̂| per element for KIVI rows x [n, D] (keys: channel groups of `group` tokens; values: rows)."""
    steps = 2 ** bits - 1
    if keys:
        staged = x.astype(np.float16).astype(np.float64)
        bound = np.empty_like(x, dtype=np.float64)
        for start in range(0, len(x), group):
            part = staged[start:start + group]
            spread = part.max(axis=0) - part.min(axis=0)
            bound[start:start + group] = spread / (2 * steps)
        bound += U16 * np.abs(x)
    else:
        bound = (x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True)) / (2 * steps) + 0 * x
    return bound + 4 * U32 * np.abs(x).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_kivi_rows_within_half_a_step(rng, bits):
    keys, values = layer(rng)
    group = 8
    cache = keep_all(kvtrim.KIVI(bits=bits, group=group), keys, values)
    for h in range(HKV):
        k, v = cache.read(0, h)
        assert np.all(np.abs(k - keys[0, h]) <= kivi_bound(keys[0, h], bits, group, True))
        assert np.all(np.abs(v - values[0, h]) <= kivi_bound(values[0, h], bits, group, False))
    # codes (b/8 bytes per element, keys and values), a value scale + zero point per token, and each key
    # group's fp32 scale + zero point per channel and sealed flag, shared by its `group` tokens
    assert cache.stats()["bytes_per_token"] == 2 * D * bits / 8 + 8 + (D * 8 + 1) / group


def test_fp8_rows_within_its_mantissa(rng):
    keys, values = layer(rng, scale=3.0)
    cache = keep_all(kvtrim.FP8(), keys, values)
    for h in range(HKV):
        for got, given in zip(cache.read(0, h), (keys[0, h], values[0, h])):
            scale = np.abs(given).max() / 448.0
            assert np.all(np.abs(got - given) <= 2.0 ** -4 * np.abs(given) + 2.0 ** -10 * scale + 4 * U32 * np.abs(given).max())
    assert cache.stats()["bytes_per_token"] == 2 * D  # one byte per element (the per-head scales are per head)


def rope(x, theta=10000.0):
    """Half-split RoPE (Llama's rotate_half) of x [T, D] at positions 0..T-1, in float64."""
    half = x.shape[-1] // 2
    inv = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    angle = np.arange(len(x))[:, None] * inv[None, :]
    a, b = x[:, :half].astype(np.float64), x[:, half:].astype(np.float64)
    return np.concatenate((a * np.cos(angle) - b * np.sin(angle), a * np.sin(angle) + b * np.cos(angle)), axis=1)


def low_rank_bound(m, rank):
    sigma = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    norm = np.linalg.norm(m.astype(np.float64))
    return np.sqrt(np.sum(sigma[rank:] ** 2)) + (U16 + 2.0 ** -10) * norm


@pytest.mark.parametrize("rank", [4, 12])
def test_low_rank_post_rope_within_the_svd_tail(rng, rank):
    keys, values = layer(rng)
    cache = keep_all(kvtrim.LowRank(rank=rank, max_rank=rank), keys, values)
    for h in range(HKV):
        k, v = cache.read(0, h)
        assert np.linalg.norm(k - keys[0, h]) <= low_rank_bound(keys[0, h], rank)
        assert np.linalg.norm(v - values[0, h]) <= low_rank_bound(values[0, h], rank)
    assert cache.stats()["bytes_per_token"] == 2 * rank * 2  # max_rank = rank fp16 coefficients, keys and values


def test_low_rank_pre_rope_rotates_the_rebuilt_keys(rng):
    """Keys of rank 4 before RoPE (as in Palu/ShadowKV): the pre-RoPE codec rebuilds them almost exactly and
    rotates them by position; the post-RoPE codec at the same rank cannot (RoPE raises the rank)."""
    rank = 4
    basis = rng.standard_normal((rank, D))
    pre = np.stack([rng.standard_normal((T, rank)) @ basis for _ in range(HKV)])[None].astype(np.float32)
    post = np.stack([rope(pre[0, h]) for h in range(HKV)])[None].astype(np.float32)
    _, values = layer(rng)
    pre_cache = keep_all(kvtrim.LowRank(rank=rank, max_rank=rank, pre_rope=True), pre, values)
    post_cache = keep_all(kvtrim.LowRank(rank=rank, max_rank=rank), post, values)
    for h in range(HKV):
        rebuilt = pre_cache.read(0, h)[0]
        error = np.linalg.norm(rebuilt - post[0, h])
        # the pre-RoPE rows' own tail, and RoPE applied in float32 on both sides (≤ 4·u32 per element of |x|)
        assert error <= low_rank_bound(pre[0, h], rank) + 4 * U32 * np.sqrt(T * D) * np.abs(post[0, h]).max()
        assert error < 0.01 * np.linalg.norm(post[0, h])
        assert np.linalg.norm(post_cache.read(0, h)[0] - post[0, h]) > 10 * error


@pytest.mark.parametrize("bits", [8, 4])
def test_layered_keeps_sinks_and_recent_in_fp16(rng, bits):
    keys, values = layer(rng)
    sinks, recent, group = 4, 16, 8
    cache = keep_all(kvtrim.Layered(kvtrim.KIVI(bits=bits, group=group), sinks=sinks, recent=recent), keys, values)
    as_fp16 = lambda x: x.astype(np.float16).astype(np.float32)  # noqa: E731
    exact = np.r_[0:sinks, T - recent:T]
    for h in range(HKV):
        k, v = cache.read(0, h)
        assert np.array_equal(k[exact], as_fp16(keys[0, h, exact]))
        assert np.array_equal(v[exact], as_fp16(values[0, h, exact]))
        assert np.all(np.abs(k - keys[0, h]) <= kivi_bound(keys[0, h], bits, group, True) + U16 * np.abs(keys[0, h]))
        assert np.all(np.abs(v - values[0, h]) <= kivi_bound(values[0, h], bits, group, False) + U16 * np.abs(values[0, h]))
