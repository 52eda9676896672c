"""kvtrim.LowRankProfile: low-rank bases calibrated offline from sample K/V (io/low_rank_profile.hpp), saved
and loaded as JSON, installed into LowRank(source="profile") caches with Cache.load_low_rank_profile.

What is checked, and why the tolerances are what they are:
  - Calibration recovers a known subspace. Samples are x = U_true c + e (c random, e a small noise, the
    sum rounded to float32); calibrate_layer takes the top right singular vectors of the stacked float32
    rows Â = A + E (A = the exact signal, E = noise and float32 rounding, both known here in float64).
    With energy 0.999 the rank is exactly U_true's (the noise holds < 1e-6 of the energy; one direction
    less misses ≥ 5%). Wedin's theorem bounds the angles between the found and the true span:
    sin θ ≤ ‖E‖₂ / δ with δ = σ_r(Â) − σ_{r+1}(A) = σ_r(Â), so the cosines (singular values of UᵀU_true)
    are ≥ √(1 − sin²θ) ≥ 1 − sin²θ; the basis is stored in float32 (‖ΔU‖₂ ≤ ‖ΔU‖_F ≤ 2^-24·√r moves
    each cosine by at most that) and the double SVD's own error is below 64·D·2^-53·σ₁/σ_r. The
    sum of the three is the tolerance on |cos − 1|.
  - Save → load and to_json → from_json give the bases back bit for bit (floats written exactly).
  - A profile with one rank for every head, loaded into a cache, gives the same storage and attention
    as the same bases installed with set_basis, bit for bit (the same per-head install).
  - Ragged ranks (calibrated from heads of different ranks, or set by hand): the storage is the
    projection onto each head's own basis — coefficients and read() bit for bit against the float32
    replay of test_low_rank_profile.py — and attention is within oracle.attention_bound of the
    float64 attention over those reconstructed rows.
  - Every refusal (head_dim, kv_heads, pre/post RoPE, a rank above the stored rank, a layer out of
    range, a layer not calibrated, bases not orthonormal, a cache without profile bases) raises
    kvtrim.Error naming the argument, and leaves every head's bases as they were.
"""

import json

import numpy as np
import pytest

import kvtrim
from oracle import attention, attention_bound
from test_low_rank_profile import lift_fp32, project_fp32

pytestmark = pytest.mark.skipif(not kvtrim.has_profiles, reason="built without nlohmann-json")

B, HQ, HKV, D, T = 2, 4, 2, 32, 40
LAYERS = 2
U24, U53 = 2.0 ** -24, 2.0 ** -53
# Ranks of the sample subspaces, per kv head (ragged on purpose): keys and values differ too.
KEY_RANKS, VALUE_RANKS = (5, 3), (2, 6)
CALIBRATE = kvtrim.LowRank(energy=0.999, max_rank=8, source="profile")


def orthonormal(rng, rank, dim=D):
    return np.linalg.qr(rng.standard_normal((dim, rank)))[0]  # float64


def samples(rng, bases, batch=3, tokens=50, noise=1e-4):
    """Samples [batch, H, tokens, D] in the span of bases[h] plus noise: (float32 samples, float64 signal)."""
    signal = np.stack([rng.standard_normal((batch, tokens, u.shape[1])) @ u.T for u in bases], axis=1)
    return (signal + noise * rng.standard_normal(signal.shape)).astype(np.float32), signal


def calibrated(seed, layers=LAYERS, key_ranks=KEY_RANKS, value_ranks=VALUE_RANKS, codec=CALIBRATE, pre_rope=False):
    """A profile calibrated from samples of known subspaces; also returns them: truth[layer] = (keys, values)."""
    rng = np.random.default_rng(seed)
    profile = kvtrim.LowRankProfile(layers, HKV, D, pre_rope=pre_rope)
    truth = []
    for layer in range(layers):
        key_bases = [orthonormal(rng, r) for r in key_ranks]
        value_bases = [orthonormal(rng, r) for r in value_ranks]
        keys, key_signal = samples(rng, key_bases)
        values, value_signal = samples(rng, value_bases)
        profile.calibrate_layer(layer, keys, values, codec)
        truth.append(((keys, key_signal, key_bases), (values, value_signal, value_bases)))
    return profile, truth


def assert_span(found, rows32, signal, true_basis):
    """found spans true_basis within Wedin's bound (module docstring)."""
    rank = true_basis.shape[1]
    assert found.dtype == np.float32 and found.shape == true_basis.shape
    observed = rows32.astype(np.float64)
    singular = np.linalg.svd(observed, compute_uv=False)
    sin = np.linalg.norm(observed - signal, 2) / singular[rank - 1]
    tolerance = sin ** 2 + U24 * np.sqrt(rank) + 64 * D * U53 * singular[0] / singular[rank - 1]
    cosines = np.linalg.svd(found.astype(np.float64).T @ true_basis, compute_uv=False)
    assert np.all(np.abs(cosines - 1.0) <= tolerance), (cosines, tolerance)


def profile_cache(press=None, layer=0, rank=None, max_rank=8, pre_rope=False, batch=B, kv_heads=HKV, dim=D, **codec):
    low_rank = kvtrim.LowRank(rank=rank, max_rank=max_rank, pre_rope=pre_rope, source="profile", **codec)
    return kvtrim.Cache(press or kvtrim.StreamingLLM(compression_ratio=0.0), low_rank, "flat", (HQ, kv_heads, dim),
                        batch, batch * kv_heads * (T + 16), layer=layer, layers=LAYERS)


def snapshot(cache):
    return [cache.low_rank(b, h) for b in range(cache._impl.batch) for h in range(cache.shape[1])]


def assert_same_storage(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for part in x:
            assert x[part].shape == y[part].shape and np.array_equal(x[part], y[part]), part


def test_calibration_recovers_each_heads_subspace_and_rank():
    profile, truth = calibrated(1)
    assert (profile.layers, profile.kv_heads, profile.head_dim, profile.pre_rope) == (LAYERS, HKV, D, False)
    for layer, ((keys, key_signal, key_bases), (values, value_signal, value_bases)) in enumerate(truth):
        for h in range(HKV):
            key_basis, value_basis = profile.bases(layer, h)
            assert key_basis.shape == (D, KEY_RANKS[h]) and value_basis.shape == (D, VALUE_RANKS[h])
            rows = lambda x: x[:, h].reshape(-1, D)  # noqa: E731 - all B·T tokens of kv head h, as calibrate stacks them
            assert_span(key_basis, rows(keys), rows(key_signal), key_bases[h])
            assert_span(value_basis, rows(values), rows(value_signal), value_bases[h])


def test_fixed_rank_and_max_rank_as_the_codec_says():
    fixed, _ = calibrated(2, layers=1, codec=kvtrim.LowRank(rank=4, source="profile"))
    capped, _ = calibrated(2, layers=1, codec=kvtrim.LowRank(energy=0.999, max_rank=3, source="profile"))
    for h in range(HKV):
        assert [b.shape[1] for b in fixed.bases(0, h)] == [4, 4]  # a fixed rank, whatever the samples' rank
        assert [b.shape[1] for b in capped.bases(0, h)] == [min(3, KEY_RANKS[h]), min(3, VALUE_RANKS[h])]
    # The first columns of a fixed-rank fit are the energy fit's (the same SVD, fewer columns): same span.
    energy, _ = calibrated(2, layers=1)
    k4, k_energy = fixed.bases(0, 1)[0], energy.bases(0, 1)[0]  # head 1: keys of rank 3 < 4
    cosines = np.linalg.svd(k4[:, :3].astype(np.float64).T @ k_energy.astype(np.float64), compute_uv=False)
    assert np.all(np.abs(cosines - 1) <= 1e-5)


def test_16_bit_samples_calibrate_as_the_same_samples_in_float32():
    # fp16/bf16 captures are widened exactly (to double, as float32 samples are): the same bases, bit for bit.
    _, truth = calibrated(15, layers=1)
    (keys, _, _), (values, _, _) = truth[0]
    keys16, values16 = keys.astype(np.float16), values.astype(np.float16)
    wide, narrow = kvtrim.LowRankProfile(1, HKV, D), kvtrim.LowRankProfile(1, HKV, D)
    wide.calibrate_layer(0, keys16.astype(np.float32), values16.astype(np.float32), CALIBRATE)
    narrow.calibrate_layer(0, keys16, values16, CALIBRATE)
    for h in range(HKV):
        for x, y in zip(wide.bases(0, h), narrow.bases(0, h)):
            assert np.array_equal(x, y)


def test_save_load_and_json_round_trips_are_bit_for_bit(tmp_path):
    for pre_rope in (False, True):
        profile, _ = calibrated(3, pre_rope=pre_rope,
                                codec=kvtrim.LowRank(energy=0.999, max_rank=8, pre_rope=pre_rope, source="profile"))
        path = tmp_path / f"profile_{pre_rope}.json"
        profile.save(path)  # os.PathLike or str
        for other in (kvtrim.LowRankProfile.load(str(path)), kvtrim.LowRankProfile.from_json(profile.to_json())):
            assert (other.layers, other.kv_heads, other.head_dim, other.pre_rope) == (LAYERS, HKV, D, pre_rope)
            for layer in range(LAYERS):
                for h in range(HKV):
                    for x, y in zip(profile.bases(layer, h), other.bases(layer, h)):
                        assert x.dtype == y.dtype == np.float32 and np.array_equal(x, y)
        document = json.loads(path.read_text())
        assert document["format"] == "kvtrim.low_rank_profile" and document["version"] == 1
        assert document["keys"] == ("pre_rope" if pre_rope else "post_rope")


def test_uniform_ranks_load_as_set_basis_installs_them(rng):
    profile, _ = calibrated(4, codec=kvtrim.LowRank(rank=6, source="profile"))
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    window = rng.standard_normal((B, HQ, 8, D)).astype(np.float32)
    new_keys, new_values = rng.standard_normal((2, B, HKV, 3, D)).astype(np.float32)
    queries = rng.standard_normal((B, HQ, D)).astype(np.float32)
    for layer in range(LAYERS):
        press = kvtrim.SnapKV(window=8, compression_ratio=0.5)
        loaded, installed = profile_cache(press, layer=layer, rank=6), profile_cache(press, layer=layer, rank=6)
        loaded.load_low_rank_profile(profile)  # the cache's own layer
        installed.set_basis(*(np.stack([profile.bases(layer, h)[part] for h in range(HKV)]) for part in (0, 1)))
        for cache in (loaded, installed):
            cache.compress(keys, values, window)
            cache.append(new_keys, new_values)
        assert_same_storage(snapshot(loaded), snapshot(installed))
        assert np.array_equal(loaded.attend(queries), installed.attend(queries))


def test_pre_rope_profiles_load_into_pre_rope_caches(rng):
    codec = dict(rank=8, pre_rope=True, rope_theta=500000.0)
    profile, _ = calibrated(5, codec=kvtrim.LowRank(source="profile", **codec), pre_rope=True)
    keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    queries = rng.standard_normal((B, HQ, D)).astype(np.float32)
    loaded = profile_cache(layer=1, max_rank=None, **codec)
    installed = profile_cache(layer=1, max_rank=None, **codec)
    loaded.load_low_rank_profile(profile)
    installed.set_basis(*(np.stack([profile.bases(1, h)[part] for h in range(HKV)]) for part in (0, 1)))
    for cache in (loaded, installed):
        cache.compress(keys, values)
    assert_same_storage(snapshot(loaded), snapshot(installed))
    assert np.array_equal(loaded.attend(queries), installed.attend(queries))


@pytest.mark.parametrize("by_hand", [False, True])
def test_ragged_ranks_store_each_heads_projection_and_attend_within_the_bound(rng, by_hand):
    if by_hand:  # a profile edited head by head (set_bases): ranks 1 and 8, keys and values apart
        profile = kvtrim.LowRankProfile(LAYERS, HKV, D)
        ranks = {(0, 0): (1, 8), (0, 1): (8, 2), (1, 0): (3, 3), (1, 1): (7, 1)}
        for (layer, h), (key_rank, value_rank) in ranks.items():
            profile.set_bases(layer, h, orthonormal(rng, key_rank).astype(np.float32),
                              orthonormal(rng, value_rank).astype(np.float32))
        layer = 0
        keys, values = rng.standard_normal((2, B, HKV, T, D)).astype(np.float32)
    else:  # calibrated from heads of ranks KEY_RANKS / VALUE_RANKS; the cache sees more of those subspaces
        profile, truth = calibrated(6)
        layer = 1
        (_, _, key_bases), (_, _, value_bases) = truth[layer]
        keys = samples(rng, key_bases, batch=B, tokens=T)[0]
        values = samples(rng, value_bases, batch=B, tokens=T)[0]
    cache = profile_cache(layer=layer)  # max_rank 8: the stored rank; each head uses its own
    cache.load_low_rank_profile(profile)
    cache.compress(keys, values)  # compression_ratio 0: every token kept, in order
    new_keys, new_values = (0.5 * rng.standard_normal((2, B, HKV, 2, D))).astype(np.float32)
    cache.append(new_keys, new_values)
    kept_keys, kept_values = [[None] * HKV for _ in range(B)], [[None] * HKV for _ in range(B)]
    for b in range(B):
        for h in range(HKV):
            stored = cache.low_rank(b, h)
            key_basis, value_basis = profile.bases(layer, h)
            assert np.array_equal(stored["key_basis"], key_basis) and np.array_equal(stored["value_basis"], value_basis)
            read_keys, read_values = cache.read(b, h)
            for x, basis, coefficients, rows, out in (
                    (np.concatenate([keys[b, h], new_keys[b, h]]), key_basis, stored["key_coefficients"], read_keys,
                     kept_keys),
                    (np.concatenate([values[b, h], new_values[b, h]]), value_basis, stored["value_coefficients"],
                     read_values, kept_values)):
                c = project_fp32(x, basis)
                assert coefficients.shape == (T + 2, basis.shape[1])
                assert np.array_equal(coefficients, c.astype(np.float32)), "coefficients = fp16(Uᵀx), bit for bit"
                rebuilt = lift_fp32(c, basis)
                assert np.array_equal(rows, rebuilt), "read() = U c, bit for bit"
                out[b][h] = rebuilt
    queries = rng.standard_normal((B, HQ, D)).astype(np.float32)
    error = np.abs(cache.attend(queries) - attention(queries, kept_keys, kept_values, HKV))
    assert np.all(error <= attention_bound(queries, kept_keys, kept_values, HKV)), f"worst {error.max():.3e}"


def test_the_workflow_capture_calibrate_save_load_serve(rng, tmp_path):
    # Offline: sample K/V of every layer from a few prompts → calibrate → save.
    profile, truth = calibrated(7)
    profile.save(str(tmp_path / "model.low_rank.json"))
    # Serving: load once; one cache per layer, each installing its own layer.
    served = kvtrim.LowRankProfile.load(tmp_path / "model.low_rank.json")
    caches = [profile_cache(kvtrim.StreamingLLM(sinks=4, compression_ratio=0.5), layer=layer) for layer in range(LAYERS)]
    for layer, cache in enumerate(caches):
        cache.load_low_rank_profile(served)
        for h in range(HKV):
            assert np.array_equal(cache.low_rank(1, h)["key_basis"], profile.bases(layer, h)[0])
            assert np.array_equal(cache.low_rank(1, h)["value_basis"], profile.bases(layer, h)[1])
        (_, _, key_bases), (_, _, value_bases) = truth[layer]
        keys = samples(rng, key_bases, batch=B, tokens=T)[0]
        values = samples(rng, value_bases, batch=B, tokens=T)[0]
        cache.compress(keys, values)
        # A sanity check, not a bound: tokens from the calibrated subspaces come back within 1% of the largest
        # entry (fp16 coefficients, 1e-4 noise off the span; a random rank-8 basis loses most of each token).
        kept = cache.positions().reshape(B, HKV, T // 2)  # every head keeps T/2 tokens
        for b in range(B):
            for h in range(HKV):
                for x, rows in zip((keys[b, h, kept[b, h]], values[b, h, kept[b, h]]), cache.read(b, h)):
                    assert np.abs(rows - x).max() <= 1e-2 * np.abs(x).max()
        out = cache.attend(rng.standard_normal((B, HQ, D)).astype(np.float32))
        assert np.all(np.isfinite(out))


def test_refused_loads_name_the_argument_and_leave_the_cache_as_it_was(rng):
    good, _ = calibrated(8)
    cache = profile_cache(layer=1)
    cache.load_low_rank_profile(good)
    before = snapshot(cache)
    other, _ = calibrated(9)  # valid, other bases: a head-by-head install would change head 0 before refusing
    # Head 1 of layer 1 with a key rank above the cache's stored rank 8 (head 0 fine).
    too_high = kvtrim.LowRankProfile.from_json(other.to_json())
    too_high.set_bases(1, 1, orthonormal(rng, 9).astype(np.float32), orthonormal(rng, 2).astype(np.float32))
    # Layer 1's last value basis no longer orthonormal (only its shape is checked by from_json).
    document = json.loads(other.to_json())
    last = document["bases"][LAYERS * HKV - 1]
    last["value_basis"] = [3.0 * x for x in last["value_basis"]]
    not_orthonormal = kvtrim.LowRankProfile.from_json(json.dumps(document))
    uncalibrated = kvtrim.LowRankProfile(LAYERS, HKV, D)
    uncalibrated.set_bases(1, 0, *other.bases(1, 0))  # head 0 of layer 1 only
    pre_rope, _ = calibrated(10, pre_rope=True,
                             codec=kvtrim.LowRank(energy=0.999, max_rank=8, pre_rope=True, source="profile"))
    prefix = r"kvtrim.Cache.load_low_rank_profile: argument "
    cases = [
        (lambda: cache.load_low_rank_profile(calibrated_dim(16)), prefix + r"'profile.head_dim': expected the cache's "
                                                                    r"head_dim = 32, got 16"),
        (lambda: cache.load_low_rank_profile(calibrated_heads(3)), prefix + r"'profile.kv_heads': expected the cache's "
                                                                     r"kv_heads = 2, got 3"),
        (lambda: cache.load_low_rank_profile(pre_rope), prefix + r"'profile.keys': expected post_rope bases .*"
                                                                 r"got pre_rope"),
        (lambda: cache.load_low_rank_profile(too_high), prefix + r"'profile.bases\[layer 1, kv_head 1\].key_basis': "
                                                                 r"expected a basis of rank 1 to 8 .*got rank 9"),
        (lambda: cache.load_low_rank_profile(not_orthonormal),
         prefix + r"'profile.bases\[layer 1, kv_head 1\].value_basis': expected orthonormal columns .*got \|UᵀU − I\| = 8"),
        (lambda: cache.load_low_rank_profile(uncalibrated), prefix + r"'profile.bases\[layer 1, kv_head 1\].key_basis': "
                                                                     r".*got rank 0 \(no basis: the layer was not calibrated\)"),
        (lambda: cache.load_low_rank_profile(other, layer=2), prefix + r"'layer': expected a layer of the profile in "
                                                                       r"\[0, 2\), got 2"),
        (lambda: cache.load_low_rank_profile(other, layer=-1), prefix + r"'layer': expected .*got -1"),
        (lambda: cache.load_low_rank_profile(other, layer=1.0), prefix + r"'layer': expected .*got 1.0"),
        (lambda: cache.load_low_rank_profile(kvtrim.Profile.for_retrieval_heads([[True, False]], HQ, D)),
         prefix + r"'profile': expected a kvtrim.LowRankProfile, got Profile"),
    ]
    for call, message in cases:
        with pytest.raises(kvtrim.Error, match=message):
            call()
        assert_same_storage(before, snapshot(cache))
    # A cache at a layer the profile does not have (its default layer) and a post_rope profile into a pre_rope cache.
    deep = profile_cache(layer=5)
    with pytest.raises(kvtrim.Error, match=prefix + r"'layer': expected a layer of the profile in \[0, 2\), got 5"):
        deep.load_low_rank_profile(good)
    rotated = profile_cache(layer=0, pre_rope=True)
    with pytest.raises(kvtrim.Error, match=prefix + r"'profile.keys': expected pre_rope bases .*got post_rope"):
        rotated.load_low_rank_profile(good)
    # Caches without profile bases.
    sequence = kvtrim.Cache(kvtrim.StreamingLLM(), kvtrim.LowRank(rank=8), "flat", (HQ, HKV, D), B, 512)
    with pytest.raises(kvtrim.Error, match=prefix + r"'cache': expected a cache with codec LowRank\(source=\"profile\"\)"
                                                    r".*got LowRank\(source=\"sequence\"\)"):
        sequence.load_low_rank_profile(good)
    fp16 = kvtrim.Cache(kvtrim.StreamingLLM(), kvtrim.FP16(), "flat", (HQ, HKV, D), B, 512)
    with pytest.raises(kvtrim.Error, match=prefix + r"'cache': expected a cache with codec LowRank\(source=\"profile\"\), "
                                                    r"got scheme<layout::flat.*codec::fp16"):
        fp16.load_low_rank_profile(good)
    # After all that, the cache still works on the bases it had.
    cache.compress(*rng.standard_normal((2, B, HKV, T, D)).astype(np.float32))
    assert_same_storage([{k: v for k, v in s.items() if k.endswith("basis")} for s in before],
                        [{k: v for k, v in s.items() if k.endswith("basis")} for s in snapshot(cache)])


def calibrated_dim(dim):
    rng = np.random.default_rng(11)
    profile = kvtrim.LowRankProfile(LAYERS, HKV, dim)
    for layer in range(LAYERS):
        x = rng.standard_normal((1, HKV, 20, dim)).astype(np.float32)
        profile.calibrate_layer(layer, x, x, kvtrim.LowRank(rank=4, source="profile"))
    return profile


def calibrated_heads(kv_heads):
    rng = np.random.default_rng(12)
    profile = kvtrim.LowRankProfile(LAYERS, kv_heads, D)
    for layer in range(LAYERS):
        x = rng.standard_normal((1, kv_heads, 20, D)).astype(np.float32)
        profile.calibrate_layer(layer, x, x, kvtrim.LowRank(rank=4, source="profile"))
    return profile


def test_profile_refusals_name_the_argument_and_change_nothing(rng, tmp_path):
    profile, truth = calibrated(13)
    before = [profile.bases(layer, h) for layer in range(LAYERS) for h in range(HKV)]
    keys = truth[0][0][0]
    function = r"kvtrim.LowRankProfile.calibrate_layer: argument "
    nan = keys.copy()
    nan[1, 0, 3, 2] = np.nan
    cases = [
        (lambda: profile.calibrate_layer(0, keys, keys, kvtrim.FP16()), function + r"'codec': expected a kvtrim.LowRank"),
        (lambda: profile.calibrate_layer(0, keys, keys, kvtrim.LowRank(rank=8, pre_rope=True)),
         function + r"'codec': expected LowRank\(pre_rope=False\), as the profile's post_rope keys, got LowRank\(pre_rope=True\)"),
        (lambda: profile.calibrate_layer(0, keys, keys, kvtrim.LowRank(rank=40)),
         function + r"'config.codec.rank': expected a rank in \[1, head_dim = 32\], got 40"),
        (lambda: profile.calibrate_layer(2, keys, keys, CALIBRATE), function + r"'layer': expected a layer of the profile "
                                                                             r"in \[0, 2\), got 2"),
        (lambda: profile.calibrate_layer(0, keys[..., :16], keys[..., :16], CALIBRATE),
         function + r"'sample_keys': expected an array \[batch, 2, tokens, 32\] on the cpu.*got float32 \[3, 2, 50, 16\]"),
        (lambda: profile.calibrate_layer(0, keys.astype(np.float64), keys, CALIBRATE),
         function + r"'sample_keys': expected float32, float16 or bfloat16 elements, got float64"),
        (lambda: profile.calibrate_layer(0, keys, keys[:, :, :10], CALIBRATE),
         function + r"'sample_values': expected the sample keys' element type and shape, float32 \[3, 2, 50, 32\], "
                    r"got float32 \[3, 2, 10, 32\]"),
        (lambda: profile.calibrate_layer(0, keys, keys.astype(np.float16), CALIBRATE),
         function + r"'sample_values': expected the sample keys' element type and shape, float32 .*got float16"),
        (lambda: profile.calibrate_layer(0, keys, nan, CALIBRATE),
         function + r"'sample_values': expected finite entries, got NaN or Inf at \[1, 0, 3, 2\]"),
        (lambda: profile.calibrate_layer(0, keys[0], keys[0], CALIBRATE), function + r"'sample_keys': expected a 4-d array"),
        (lambda: profile.set_bases(0, 1, orthonormal(rng, 4).astype(np.float32), 2 * orthonormal(rng, 4).astype(np.float32)),
         r"kvtrim.LowRankProfile.set_bases: argument 'value_basis': expected orthonormal columns .*got \|UᵀU − I\| = 3"),
        (lambda: profile.set_bases(0, 2, *profile.bases(0, 0)),
         r"kvtrim.LowRankProfile.set_bases: argument 'kv_head': expected a kv head in \[0, 2\), got 2"),
        (lambda: profile.set_bases(0, 0, np.zeros((D, 0), np.float32), profile.bases(0, 0)[1]),
         r"kvtrim.LowRankProfile.set_bases: argument 'key_basis': expected a float32 array \[32, rank\] on the cpu with "
         r"rank 1 to 32, got float32 \[32, 0\]"),
        (lambda: profile.bases(-1, 0), r"kvtrim.LowRankProfile.bases: argument 'layer': expected a layer of the profile in "
                                       r"\[0, 2\), got -1"),
    ]
    for call, message in cases:
        with pytest.raises(kvtrim.Error, match=message):
            call()
        after = [profile.bases(layer, h) for layer in range(LAYERS) for h in range(HKV)]
        assert all(np.array_equal(x, y) for pair, other in zip(before, after) for x, y in zip(pair, other))
    # Profiles that are not complete, not JSON, or not this format.
    partial = kvtrim.LowRankProfile(LAYERS, HKV, D)
    partial.calibrate_layer(0, keys, keys, CALIBRATE)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.LowRankProfile.save: argument 'bases\[layer 1, kv_head 0\]': "
                                           r"expected ranks in \[1, head_dim = 32\].*got key rank 0"):
        partial.save(tmp_path / "partial.json")
    assert not (tmp_path / "partial.json").exists()
    with pytest.raises(kvtrim.Error, match=r"kvtrim.LowRankProfile.to_json: argument 'bases\[layer 1, kv_head 0\]'"):
        partial.to_json()
    with pytest.raises(kvtrim.Error, match=r"kvtrim.LowRankProfile.from_json: argument 'text': expected valid JSON"):
        kvtrim.LowRankProfile.from_json("{not json")
    document = json.loads(profile.to_json())
    document["version"] = 2
    with pytest.raises(kvtrim.Error, match=r"from_json: argument 'version': expected 1, got 2"):
        kvtrim.LowRankProfile.from_json(json.dumps(document))
    with pytest.raises(kvtrim.Error, match=r"kvtrim::io::low_rank_profile::load: open .*missing.json failed"):
        kvtrim.LowRankProfile.load(tmp_path / "missing.json")
    with pytest.raises(kvtrim.Error, match=r"kvtrim::io::low_rank_profile::empty: argument 'kv_heads'"):
        kvtrim.LowRankProfile(2, 0, D)


# ---- CUDA: the same profile into a device cache (skipped without torch, a GPU or a CUDA build) ----

CUDA_DIM = 64  # a head_dim the CUDA decode is compiled for


def test_cuda_load_equals_the_cpu_load():
    torch = pytest.importorskip("torch")
    if not (torch.cuda.is_available() and kvtrim.has_cuda):
        pytest.skip("needs a GPU and kvtrim built with CUDA")
    from test_cuda_speculative import low_rank_attention_bound

    rng = np.random.default_rng(14)
    profile = kvtrim.LowRankProfile(LAYERS, HKV, CUDA_DIM)
    for layer in range(LAYERS):
        keys = samples(rng, [orthonormal(rng, r, CUDA_DIM) for r in (5, 12)])[0]
        values = samples(rng, [orthonormal(rng, r, CUDA_DIM) for r in (9, 2)])[0]
        profile.calibrate_layer(layer, keys, values, kvtrim.LowRank(energy=0.999, max_rank=16, source="profile"))
    assert [profile.bases(1, h)[0].shape[1] for h in range(HKV)] == [5, 12]
    keys, values = rng.standard_normal((2, B, HKV, T, CUDA_DIM)).astype(np.float32)
    new_keys, new_values = rng.standard_normal((2, B, HKV, 2, CUDA_DIM)).astype(np.float32)
    queries = rng.standard_normal((B, HQ, CUDA_DIM)).astype(np.float32)
    caches, outs = {}, {}
    for device in ("cpu", "cuda"):
        move = (lambda x: torch.from_numpy(x).cuda()) if device == "cuda" else (lambda x: x)
        cache = caches[device] = kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, compression_ratio=0.5),
                                              kvtrim.LowRank(max_rank=16, source="profile"), "flat", (HQ, HKV, CUDA_DIM),
                                              B, B * HKV * (T + 8), device=device, layer=1, layers=LAYERS)
        cache.load_low_rank_profile(profile)
        cache.compress(move(keys), move(values))
        cache.append(move(new_keys), move(new_values))
        out = cache.attend(move(queries))
        outs[device] = out.cpu().numpy() if device == "cuda" else out
    stored = {device: snapshot(cache) for device, cache in caches.items()}
    assert_same_storage(stored["cpu"], stored["cuda"])  # the same bases; the device encodes the CPU's coefficients
    error = np.abs(outs["cuda"] - outs["cpu"])
    assert np.all(error <= low_rank_attention_bound(queries, stored["cpu"], HKV)), f"worst {error.max():.3e}"
    # A refusal on the device leaves its bases as they were (checked before the first copy).
    too_high = kvtrim.LowRankProfile.from_json(profile.to_json())
    too_high.set_bases(1, 1, orthonormal(rng, 17, CUDA_DIM).astype(np.float32),
                       orthonormal(rng, 2, CUDA_DIM).astype(np.float32))
    with pytest.raises(kvtrim.Error, match=r"'profile.bases\[layer 1, kv_head 1\].key_basis': expected a basis of rank "
                                           r"1 to 16 .*got rank 17"):
        caches["cuda"].load_low_rank_profile(too_high)
    assert_same_storage(stored["cuda"], snapshot(caches["cuda"]))
