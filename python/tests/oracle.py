"""NumPy oracles for kvtrim's Python tests: brute-force kept sets and double-precision attention.

The attention tolerance is tests/common/tolerance.hpp's bound, ported: for one
query head over n kept tokens of dimension D (u = 2^-24; u_s the storage type's
unit roundoff when the cache rounds its inputs, else 0),
    S = max_i Σ_d |q_d k_id| / √D,   V = max_{i,d} |v_id|,   δ = (u_s + (D + 5)·u)·S
    |out − oracle| ≤ (e^(2δ + 4u) − 1)·V + (u_s + (2n + 1)·u)·V
"""

import numpy as np

U32 = 2.0 ** -24
UNIT_ROUNDOFF = {"fp32": 0.0, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def top_k(scores, k):
    """Indices of the k largest scores, ties to the lower index, ascending (kvtrim's select_top_k)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:k])


def resolve_keep(tokens, compression_ratio=None, keep_tokens=None):
    count = keep_tokens if keep_tokens else int(np.floor((1.0 - compression_ratio) * tokens))
    return max(1, min(count, tokens))


def streaming_kept(tokens, sinks, keep):
    """StreamingLLM: the first `sinks` tokens and the most recent ones, `keep` in all."""
    scores = [np.inf if j < sinks else float(j) for j in range(tokens)]
    return top_k(scores, keep)


def snapkv_scores(keys, window_queries, window, kernel):
    """SnapKV scores [H_kv, T] of one sequence (docs/policies/snapkv.md), in float64.

    keys [H_kv, T, D], window_queries [H_q, >= window, D] (the last `window` are read).
    """
    kv_heads, tokens, dim = keys.shape
    q_heads = window_queries.shape[0]
    group = q_heads // kv_heads
    prefix = tokens - window
    scores = np.empty((kv_heads, tokens))
    for h in range(kv_heads):
        pooled = []
        for g in range(h * group, (h + 1) * group):
            q = window_queries[g, -window:].astype(np.float64)
            logits = q @ keys[h].astype(np.float64).T / np.sqrt(dim)
            for t in range(window):
                logits[t, prefix + t + 1:] = -np.inf  # causal: query t sits at position prefix + t
            weights = np.exp(logits - logits.max(axis=1, keepdims=True))
            weights /= weights.sum(axis=1, keepdims=True)
            a = weights[:, :prefix].mean(axis=0)
            padded = np.concatenate([np.zeros(kernel // 2), a, np.zeros(kernel // 2)])
            pooled.append(np.array([padded[j:j + kernel].sum() / kernel for j in range(prefix)]))
        scores[h, :prefix] = np.mean(pooled, axis=0)
        scores[h, prefix:] = np.inf
    return scores


def attention(queries, kept_keys, kept_values, kv_heads):
    """Double-precision decode attention: queries [B, H_q, D]; kept_* [b][h] -> [n, D] arrays."""
    batch, q_heads, dim = queries.shape
    group = q_heads // kv_heads
    out = np.empty((batch, q_heads, dim))
    for b in range(batch):
        for j in range(q_heads):
            k = kept_keys[b][j // group].astype(np.float64)
            v = kept_values[b][j // group].astype(np.float64)
            logits = k @ queries[b, j].astype(np.float64) / np.sqrt(dim)
            w = np.exp(logits - logits.max())
            out[b, j] = (w / w.sum()) @ v
    return out


def attention_bound(queries, kept_keys, kept_values, kv_heads, storage_roundoff=0.0):
    """The worst-case bound above, per (b, j), broadcastable against [B, H_q, D]."""
    batch, q_heads, dim = queries.shape
    group = q_heads // kv_heads
    bounds = np.empty((batch, q_heads, 1))
    for b in range(batch):
        for j in range(q_heads):
            k = kept_keys[b][j // group].astype(np.float64)
            v = kept_values[b][j // group].astype(np.float64)
            largest_logit = (np.abs(k * queries[b, j].astype(np.float64)).sum(axis=1) / np.sqrt(dim)).max()
            largest_value = np.abs(v).max()
            n = k.shape[0]
            delta = (storage_roundoff + (dim + 5) * U32) * largest_logit
            bounds[b, j, 0] = np.expm1(2 * delta + 4 * U32) * largest_value + (storage_roundoff + (2 * n + 1) * U32) * largest_value
    return bounds


def random_layer(rng, batch=1, q_heads=4, kv_heads=2, tokens=64, dim=16, window=None, dtype=np.float32):
    keys = rng.standard_normal((batch, kv_heads, tokens, dim)).astype(dtype)
    values = rng.standard_normal((batch, kv_heads, tokens, dim)).astype(dtype)
    queries = rng.standard_normal((batch, q_heads, window or tokens, dim)).astype(dtype)
    return keys, values, queries


# ---- reading what a kvtrim.Cache reports (kept() and positions() as lists per flattened head) ----


def kept_by_head(cache):
    """kept() as one sorted list per flattened head, after checking its CSR form."""
    offsets, tokens = cache.kept()
    assert offsets.dtype == np.int64 and tokens.dtype == np.int32
    assert offsets[0] == 0 and len(offsets) == len(cache.head_lengths()) + 1 and offsets[-1] == len(tokens)
    heads = [list(tokens[offsets[i]:offsets[i + 1]]) for i in range(len(offsets) - 1)]
    assert all(head == sorted(head) for head in heads)  # ascending per head
    return heads


def positions_by_head(cache):
    """positions() split by head_lengths() (the same CSR as kept())."""
    positions, lengths = cache.positions(), cache.head_lengths()
    assert positions.dtype == np.int32 and len(positions) == lengths.sum()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    return [list(positions[starts[i]:starts[i + 1]]) for i in range(len(lengths))]
