"""RazorAttention calibration from Python: probe → attention rows → scores → profile → RazorAttention."""

import numpy as np
import pytest

import kvtrim
from oracle import random_layer

LAYERS, Q_HEADS, KV_HEADS, DIM = 2, 4, 2, 16
INDUCTION = (1, 2)  # (layer, q head) that copies: kv head 1 of layer 1


def probe_attention(probe, layer, rows):
    """[q_heads, rows, L]: causal uniform rows; the induction head puts 60% on the tokens after earlier copies."""
    length, block = probe.length, probe.block
    out = np.zeros((Q_HEADS, len(rows), length), np.float32)
    for r, p in enumerate(rows):
        out[:, r, : p + 1] = 1.0 / (p + 1)
        copies = (p - 1) // block if p > block else 0
        if (layer, 2) == INDUCTION and copies:
            out[2, r] *= 0.4
            for k in range(1, copies + 1):
                out[2, r, p - k * block + 1] += 0.6 / copies
    return out


def calibrate():
    probe = kvtrim.Probe(block=16, repeats=3, first_id=10, end_id=100, seed=7)
    tokens = probe.tokens()
    assert tokens.dtype == np.int32 and len(tokens) == probe.length == 49 and tokens[0] == 1
    assert np.array_equal(tokens[1:17], tokens[17:33])  # the block repeats
    calibration = kvtrim.Calibration(LAYERS, Q_HEADS, KV_HEADS, DIM, probe)
    for layer in range(LAYERS):
        for first in range(0, probe.length, 20):
            rows = range(first, min(first + 20, probe.length))
            calibration.accumulate(layer, probe_attention(probe, layer, rows), first)
    return probe, calibration


def test_scores_find_the_induction_head():
    _, calibration = calibrate()
    induction = np.array(calibration.scores()["induction"])
    assert induction.shape == (LAYERS * KV_HEADS,)
    assert int(np.argmax(induction)) == 1 * KV_HEADS + 1


@pytest.mark.skipif(not kvtrim.has_profiles, reason="built without nlohmann-json")
def test_profile_from_calibration_drives_razor_attention(rng, tmp_path):
    _, calibration = calibrate()
    profile = calibration.profile(induction_fraction=0.25, echo_fraction=0.0)
    assert profile.retrieval(0) == [False, False] and profile.retrieval(1) == [False, True]
    profile.save(str(tmp_path / "razor.json"))
    press = kvtrim.RazorAttention(str(tmp_path / "razor.json"), sinks=2, min_recent=8, recent_fraction=0.1)
    keys, values, _ = random_layer(rng, 1, Q_HEADS, KV_HEADS, 64, DIM)
    cache = kvtrim.Cache(press, kvtrim.FP16(), "flat", (Q_HEADS, KV_HEADS, DIM), 1, 256, layer=1, layers=LAYERS)
    cache.compress(keys, values)
    assert list(cache.head_lengths()) == [2 + 8 + 1, 64]


def test_calibration_errors():
    probe = kvtrim.Probe(block=16, repeats=3, first_id=10, end_id=100)
    calibration = kvtrim.Calibration(LAYERS, Q_HEADS, KV_HEADS, DIM, probe)
    with pytest.raises(kvtrim.Error, match=r"argument 'attention': expected all 32 scored probe rows"):
        calibration.scores()
    with pytest.raises(kvtrim.Error, match=r"argument 'attention': expected float32, float16 or bfloat16 elements, got float64"):
        calibration.accumulate(0, np.zeros((Q_HEADS, 4, 49)), 0)
    with pytest.raises(kvtrim.Error, match=r"argument 'probe.end_id'"):
        kvtrim.Probe(block=16, first_id=10, end_id=20)
