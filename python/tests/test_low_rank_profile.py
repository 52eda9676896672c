"""LowRank(source="profile") on the CPU: bases installed with Cache.set_basis, storage read back with
Cache.low_rank, against NumPy.

The codec stores a token x of kv head h as c = fp16(Uᵀx), U = the head's D × r basis, summed in
fp32 over d = 0, 1, … with every product and sum rounded (codec/low_rank.hpp project(); no fma on
the project's x86-64 builds), and reads it back as x̂ = U c, again in fp32 over j = 0, 1, …
(lift()). Both are replayed here in float32 in the same order, so the coefficients and read()'s
rows are checked bit for bit. Against the exact projection U Uᵀx (float64), the derived bound per
element d is
    |x̂_d − (U Uᵀx)_d| ≤ Σ_j |U_dj|·(u16·|c*_j| + (D + 1)·u32·Σ_e |U_ej x_e|) + (r + 1)·u32·Σ_j |U_dj c_j|
(c* = Uᵀx exact: fp32 summation error of the projection, fp16 rounding of the coefficient, fp32
summation of the lift; u16 = 2^-11, u32 = 2^-24). A token inside the span of U is thereby
reconstructed to fp16 precision. Attention over the cache equals oracle.attention over read()'s
rows within oracle.attention_bound (storage roundoff 0: read() returns what attention reads).
"""

import numpy as np
import pytest

import kvtrim
from oracle import attention, attention_bound

B, HQ, HKV, D, T = 2, 4, 2, 32, 40
U16, U32 = 2.0 ** -11, 2.0 ** -24


def bases(seed, rank, heads=HKV):
    rng = np.random.default_rng(seed)
    return np.stack([np.linalg.qr(rng.standard_normal((D, rank)))[0] for _ in range(heads)]).astype(np.float32)


def cache_with(key_bases, value_bases, layout="flat", press=None, rank=8, max_rank=None, **codec):
    low_rank = kvtrim.LowRank(rank=rank, max_rank=max_rank, source="profile", **codec)
    cache = kvtrim.Cache(press or kvtrim.StreamingLLM(compression_ratio=0.0), low_rank, layout, (HQ, HKV, D), B,
                         B * HKV * (T + 16))
    if key_bases is not None:
        cache.set_basis(key_bases, value_bases)
    return cache


def project_fp32(x, basis):
    """The codec's c = Uᵀx: float32, d ascending, each product and sum rounded, then fp16."""
    acc = np.zeros((x.shape[0], basis.shape[1]), np.float32)
    for d in range(x.shape[1]):
        acc = (acc + (basis[d][None, :] * x[:, d:d + 1]).astype(np.float32)).astype(np.float32)
    return acc.astype(np.float16)


def lift_fp32(c, basis):
    """The codec's x̂ = U c: float32, j ascending."""
    out = np.zeros((c.shape[0], basis.shape[0]), np.float32)
    for j in range(basis.shape[1]):
        out = (out + (basis[:, j][None, :] * c[:, j:j + 1].astype(np.float32)).astype(np.float32)).astype(np.float32)
    return out


def reconstruction_bound(x, basis, c):
    u, x64, c64 = basis.astype(np.float64), x.astype(np.float64), c.astype(np.float64)
    exact = x64 @ u                                     # c* [n, r]
    partial = np.abs(x64[:, :, None] * u[None, :, :]).sum(axis=1)  # Σ_e |U_ej x_e| [n, r]
    per_coefficient = U16 * np.abs(exact) + (D + 1) * U32 * partial
    return per_coefficient @ np.abs(u).T + (u.shape[1] + 1) * U32 * (np.abs(c64) @ np.abs(u).T)


@pytest.mark.parametrize("key_rank,value_rank", [(8, 8), (4, 8), (8, 1)])
def test_storage_is_the_projection_onto_the_installed_bases(rng, key_rank, value_rank):
    key_bases, value_bases = bases(1, key_rank), bases(2, value_rank)
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    cache = cache_with(key_bases, value_bases)
    cache.compress(keys, values)
    new_keys, new_values = rng.standard_normal((2, B, HKV, 3, D)).astype(np.float32)
    cache.append(new_keys, new_values)
    for b in range(B):
        for h in range(HKV):
            stored = cache.low_rank(b, h)
            assert np.array_equal(stored["key_basis"], key_bases[h])
            assert np.array_equal(stored["value_basis"], value_bases[h])
            read_keys, read_values = cache.read(b, h)
            for x, basis, coefficients, rows in (
                    (np.concatenate([keys[b, h], new_keys[b, h]]), key_bases[h], stored["key_coefficients"], read_keys),
                    (np.concatenate([values[b, h], new_values[b, h]]), value_bases[h], stored["value_coefficients"],
                     read_values)):
                assert coefficients.shape == (T + 3, basis.shape[1]) and rows.shape == (T + 3, D)
                c = project_fp32(x, basis)
                assert np.array_equal(coefficients, c.astype(np.float32)), "coefficients = fp16(Uᵀx), bit for bit"
                assert np.array_equal(rows, lift_fp32(c, basis)), "read() = U c, bit for bit"
                exact = (x.astype(np.float64) @ basis.astype(np.float64)) @ basis.astype(np.float64).T
                assert np.all(np.abs(rows - exact) <= reconstruction_bound(x, basis, c))


def test_tokens_in_the_span_come_back_to_fp16_precision(rng):
    key_bases, value_bases = bases(3, 8), bases(4, 8)
    coefficients = rng.standard_normal((2, B, HKV, T, 8))
    keys = np.einsum("bhtr,hdr->bhtd", coefficients[0], key_bases).astype(np.float32)
    values = np.einsum("bhtr,hdr->bhtd", coefficients[1], value_bases).astype(np.float32)
    cache = cache_with(key_bases, value_bases)
    cache.compress(keys, values)
    for b in range(B):
        for h in range(HKV):
            read_keys, read_values = cache.read(b, h)
            for x, rows in ((keys[b, h], read_keys), (values[b, h], read_values)):
                # |x − x̂| ≤ ‖U‖·fp16 rounding of ‖c‖ plus fp32 sums: far below a random rank-8 approximation's error.
                scale = np.abs(x).max()
                assert np.abs(rows - x).max() <= (2 * U16 + 4 * (D + 8) * U32) * np.sqrt(8) * scale


@pytest.mark.parametrize("press", ["streaming", "snapkv", "adasnapkv"])
def test_attention_over_profile_bases_matches_the_oracle(rng, press):
    presses = {"streaming": kvtrim.StreamingLLM(sinks=4, compression_ratio=0.5),
               "snapkv": kvtrim.SnapKV(window=8, compression_ratio=0.5),
               "adasnapkv": kvtrim.AdaKV(kvtrim.SnapKV(window=8, compression_ratio=0.5))}
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    window = rng.standard_normal((B, HQ, 8, D)).astype(np.float32)
    cache = cache_with(bases(5, 8), bases(6, 8), press=presses[press])
    cache.compress(keys, values, window)
    cache.append(*rng.standard_normal((2, B, HKV, 2, D)).astype(np.float32))
    queries = rng.standard_normal((B, HQ, D)).astype(np.float32)
    rows = [[cache.read(b, h) for h in range(HKV)] for b in range(B)]
    kept_keys = [[r[0] for r in seq] for seq in rows]
    kept_values = [[r[1] for r in seq] for seq in rows]
    error = np.abs(cache.attend(queries) - attention(queries, kept_keys, kept_values, HKV))
    assert np.all(error <= attention_bound(queries, kept_keys, kept_values, HKV))
    # Multi-query over the same storage: the last of two rows sees everything.
    two = rng.standard_normal((B, HQ, 2, D)).astype(np.float32)
    assert np.array_equal(cache.attend(two)[:, :, 1], cache.attend(np.ascontiguousarray(two[:, :, 1])))


def test_a_smaller_basis_than_the_stored_rank_and_replacing_bases(rng):
    # max_rank 8 (energy-chosen ranks' cap) is the stored rank; a rank-3 basis uses 3 of the 8 columns.
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    cache = cache_with(bases(7, 3), bases(8, 5), rank=None, max_rank=8)
    cache.compress(keys, values)
    first = cache.low_rank(1, 0)
    assert first["key_coefficients"].shape == (T, 3) and first["value_coefficients"].shape == (T, 5)
    # New bases serve the next compress; nothing else about the cache changes with them.
    cache.set_basis(bases(9, 8), bases(10, 8))
    cache.compress(keys, values)
    second = cache.low_rank(1, 0)
    assert second["key_coefficients"].shape == (T, 8)
    assert np.array_equal(second["key_coefficients"], project_fp32(keys[1, 0], bases(9, 8)[0]).astype(np.float32))


def test_truncate_with_profile_bases_equals_appending_less(rng):
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    drafts = rng.standard_normal((2, B, HKV, 5, D)).astype(np.float32)
    a, b = cache_with(bases(11, 8), bases(12, 8)), cache_with(bases(11, 8), bases(12, 8))
    for c in (a, b):
        c.compress(keys, values)
    a.append(drafts[0], drafts[1])
    a.truncate(3)  # profile bases never refresh: any drop up to the heads' lengths is exact
    b.append(drafts[0][:, :, :2], drafts[1][:, :, :2])
    for s in range(B):
        for h in range(HKV):
            for x, y in zip(a.read(s, h), b.read(s, h)):
                assert np.array_equal(x, y)
    q = rng.standard_normal((B, HQ, D)).astype(np.float32)
    assert np.array_equal(a.attend(q), b.attend(q))


def test_set_basis_refuses_bad_bases_and_installs_nothing(rng):
    good_keys, good_values = bases(13, 8), bases(14, 8)
    cache = cache_with(good_keys, good_values)
    # Other bases whose last head is bad: a call that installed head by head would change head 0.
    half_bad = bases(16, 8)
    half_bad[1, :, 0] *= 2.0  # kv head 1's first column is not unit length
    nan = bases(17, 8)
    nan[1, 3, 2] = np.nan
    cases = [
        ((half_bad, good_values), r"kvtrim.Cache.set_basis: argument 'key_bases': expected orthonormal columns .* "
                                  r"got \|UᵀU − I\| = 3 in kv head 1"),
        ((bases(18, 8), nan), r"argument 'value_bases': expected finite entries, got NaN or Inf in kv head 1"),
        ((bases(15, 9), good_values), r"argument 'key_bases': expected a float32 array \[2, 32, rank\] on the cpu "
                                      r"with rank 1 to 8 .*got float32 \[2, 32, 9\]"),
        ((bases(15, 8, heads=3), good_values), r"argument 'key_bases'.*got float32 \[3, 32, 8\]"),
        ((good_keys.astype(np.float64), good_values), r"argument 'key_bases'.*got float64|argument 'key_bases'.*float32"),
        ((good_keys[0], good_values), r"argument 'key_bases': expected a 3-d array"),
    ]
    for arguments, message in cases:
        with pytest.raises(kvtrim.Error, match=message):
            cache.set_basis(*arguments)
        for b in range(B):
            for h in range(HKV):
                stored = cache.low_rank(b, h)
                assert np.array_equal(stored["key_basis"], good_keys[h])
                assert np.array_equal(stored["value_basis"], good_values[h])


def test_profile_source_errors():
    with pytest.raises(kvtrim.Error, match=r"kvtrim.LowRank: argument 'source': expected 'sequence' or 'profile', got 'svd'"):
        kvtrim.LowRank(rank=4, source="svd")
    no_basis = cache_with(None, None)
    keys = np.zeros((B, HKV, T, D), np.float32)
    with pytest.raises(kvtrim.Error, match=r"a basis for every head .*got none for head 0"):
        no_basis.compress(keys, keys)
    sequence = kvtrim.Cache(kvtrim.StreamingLLM(), kvtrim.LowRank(rank=8), "flat", (HQ, HKV, D), B, 512)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.set_basis: argument 'cache': expected a cache with codec "
                                           r"LowRank\(source=\"profile\"\).*got LowRank\(source=\"sequence\"\)"):
        sequence.set_basis(bases(1, 8), bases(2, 8))
    fp16 = kvtrim.Cache(kvtrim.StreamingLLM(), kvtrim.FP16(), "flat", (HQ, HKV, D), B, 512)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.set_basis: argument 'cache': expected a cache with codec "
                                           r"LowRank\(source=\"profile\"\), got scheme<layout::flat.*codec::fp16"):
        fp16.set_basis(bases(1, 8), bases(2, 8))
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.low_rank: argument 'cache': expected a cache with codec LowRank"):
        fp16.low_rank(0, 0)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.low_rank: argument 'h': expected a kv head in \[0, 2\), got 2"):
        cache_with(bases(1, 8), bases(2, 8)).low_rank(0, 2)


def test_sequence_bases_read_back_too(rng):
    # The default source fits bases at compress: low_rank() shows them (orthonormal, rank ≤ 8) and
    # read() is their lift of the stored coefficients.
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    cache = kvtrim.Cache(kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.LowRank(rank=8), "flat", (HQ, HKV, D), B, 512)
    cache.compress(keys, values)
    stored = cache.low_rank(1, 1)
    u = stored["key_basis"].astype(np.float64)
    assert u.shape == (D, 8) and np.abs(u.T @ u - np.eye(8)).max() <= 1e-5
    assert np.array_equal(cache.read(1, 1)[0], lift_fp32(stored["key_coefficients"].astype(np.float16), stored["key_basis"]))
