"""kvtrim: KV-cache compression for transformer decoders, from Python.

    import numpy as np, kvtrim
    cache = kvtrim.Cache(kvtrim.SnapKV(window=64, compression_ratio=0.75), kvtrim.FP16(),
                         layout="contiguous", shape=(32, 8, 128), batch=1, capacity=1024 + 64)
    cache.compress(keys, values, window_queries)   # [B, H_kv, T, D], [B, H_kv, T, D], [B, H_q, w, D]
    cache.append(new_keys, new_values)             # [B, H_kv, n, D]
    out = cache.attend(queries)                    # [B, H_q, D]
    # speculative decoding: append L drafts, attend [B, H_q, L, D] (causal over them), roll back the rejected
    cache.append(draft_keys, draft_values)         # [B, H_kv, L, D]
    out = cache.attend(draft_queries)              # [B, H_q, L, D]
    cache.truncate(rejected)                       # an int, or one count per sequence

Errors from kvtrim (bad shapes, dtypes, devices, budgets) raise kvtrim.Error, a
ValueError whose message is kvtrim's: function, argument, what was expected, what came.
"""

from . import _kvtrim
from ._kvtrim import Calibration, Error, Probe, Settings, has_cuda, has_profiles
from .cache import Cache, schemes
from .eviction import Eviction
from .presses import (
    BF16,
    FP16,
    FP8,
    FP32,
    H2O,
    KIVI,
    Layered,
    LowRank,
    AdaKV,
    Codec,
    ExternalScores,
    KeyNorm,
    Knorm,
    ObservedAttention,
    Press,
    Pyramid,
    RazorAttention,
    SnapKV,
    StreamingLLM,
)

if has_profiles:
    from ._kvtrim import LowRankProfile, Profile

__version__ = "0.1.0"

__all__ = [
    "Error", "Settings", "Probe", "Calibration", "Cache", "schemes", "Eviction", "has_cuda", "has_profiles",
    "Press", "StreamingLLM", "SnapKV", "H2O", "ObservedAttention", "KeyNorm", "Knorm", "ExternalScores", "AdaKV", "Pyramid",
    "RazorAttention", "Codec", "FP16", "BF16", "FP32", "KIVI", "FP8", "LowRank", "Layered",
] + (["Profile", "LowRankProfile"] if has_profiles else [])
