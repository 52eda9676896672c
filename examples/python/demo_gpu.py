"""The demo's GPU part (scripts/demo runs it when a GPU, torch and a CUDA build of kvtrim's Python package are there).

The same layer as examples/demo.cpp (one Llama-3-8B-like layer: 32 query heads over 8 kv heads of 128, 4096
fp16 prompt tokens with sinks, recency, sharp and diffuse heavy hitters and a retrieval head whose next query
asks for a fact 3000 tokens back), built the same way with NumPy's generator, and the same four policies at the
same kept fractions — compressed by kvtrim's CUDA backend and, from the same fp16 inputs, by its CPU backend:
  - kept: tokens held per kv head are the same sets on both backends ("same" column: every head's kept set);
  - error: relative L2 error of decode attention against the full cache (torch, float32), other heads and
    [retrieval head] as in the CPU table;
  - time: kvtrim's CUDA compress (scoring, budget, selection, compaction into its cache) against the same
    policy written in torch (scores, top-k, gather into a new tensor), median of 20 calls after warm-up, CUDA
    events, one layer of batch 1.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch

import kvtrim

Q_HEADS, KV_HEADS, DIM, TOKENS, WINDOW, SINKS = 32, 8, 128, 4096, 32, 4
GROUP = Q_HEADS // KV_HEADS
RETRIEVAL_HEAD, FACT_AT, FACT_TOKENS, STRENGTH = 6, TOKENS - 3000, 24, 4.0
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)


def make_layer(seed=2024):
    """examples/demo.cpp's make_layer, with NumPy's generator (the structure, not the same random numbers)."""
    rng = np.random.default_rng(seed)
    scale = math.sqrt(DIM) / STRENGTH
    keys = np.empty((1, KV_HEADS, TOKENS, DIM), np.float32)
    values = rng.standard_normal((1, KV_HEADS, TOKENS, DIM)).astype(np.float32)
    window = np.empty((1, Q_HEADS, WINDOW, DIM), np.float32)
    queries = np.empty((1, Q_HEADS, DIM), np.float32)
    for h in range(KV_HEADS):
        u = rng.standard_normal(DIM)
        u /= np.linalg.norm(u)
        w = rng.standard_normal(DIM)
        w -= (w @ u) * u
        w /= np.linalg.norm(w)
        i = np.arange(TOKENS)
        logit = np.where(i < SINKS, 8.0, 4.0 * np.exp(-(TOKENS - 1 - i) / 256.0))
        heavy = 0 if h <= 2 or h == RETRIEVAL_HEAD else 400 if h in (5, 7) else 8
        logit[64 + rng.integers(0, TOKENS - 1024, heavy)] = 3.0 if h in (5, 7) else 7.0
        along = logit[:, None] * scale * u[None, :]
        if h == RETRIEVAL_HEAD:
            along[FACT_AT:FACT_AT + FACT_TOKENS] += 9.0 * scale * w
        keys[0, h] = rng.standard_normal((TOKENS, DIM)) + along
        for j in range(h * GROUP, (h + 1) * GROUP):
            window[0, j] = STRENGTH * u + 0.3 * rng.standard_normal((WINDOW, DIM))
            queries[0, j] = STRENGTH * (w if h == RETRIEVAL_HEAD else u) + 0.3 * rng.standard_normal(DIM)
    half = lambda a: a.astype(np.float16)  # noqa: E731 - an fp16 cache, as the C++ demo's
    return half(keys), half(values), half(window), half(queries)


def presses(fraction):
    keep = int(fraction * TOKENS)
    snap = lambda: kvtrim.SnapKV(window=WINDOW, kernel=5, tokens=keep)  # noqa: E731
    others = (KV_HEADS * keep - TOKENS) // (KV_HEADS - 1) - SINKS - 1  # Razor: the retrieval head keeps everything
    flags = [[h == RETRIEVAL_HEAD for h in range(KV_HEADS)]]
    return {
        "StreamingLLM": kvtrim.StreamingLLM(sinks=SINKS, tokens=keep),
        "SnapKV": snap(),
        "Ada-SnapKV": kvtrim.AdaKV(snap(), alpha=0.2),
        "RazorAttention": (kvtrim.RazorAttention(flags, sinks=SINKS, min_recent=others, recent_fraction=0.0)
                           if others >= 1 else None),
    }, keep, others


# ---- the same policies in torch (the timing peer) -------------------------------------------------------------


def snapkv_scores(k, q_window, kernel=5):
    """SnapKV's pooled window attention [H_kv, T] (mean over the window and the GQA group)."""
    T = k.shape[1]
    logits = torch.einsum("hgwd,htd->hgwt", q_window.view(KV_HEADS, GROUP, WINDOW, DIM).float(), k.float()) / math.sqrt(DIM)
    causal = torch.arange(T, device=k.device)[None, :] > (T - WINDOW + torch.arange(WINDOW, device=k.device))[:, None]
    probs = torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1)
    scores = probs.mean(dim=(1, 2))
    scores = torch.nn.functional.avg_pool1d(scores[:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    scores[:, -WINDOW:] = float("inf")  # the window itself is always kept
    return scores


def torch_policy(name, k, v, q_window, keep, others):
    """Keys and values each head keeps (a list per head: ragged budgets stay ragged)."""
    k, v, q_window = k[0], v[0], q_window[0]
    if name == "StreamingLLM":
        return (torch.cat((k[:, :SINKS], k[:, TOKENS - keep + SINKS:]), 1),
                torch.cat((v[:, :SINKS], v[:, TOKENS - keep + SINKS:]), 1))
    if name == "SnapKV":
        index = snapkv_scores(k, q_window).topk(keep, dim=-1).indices.sort(dim=-1).values
        return k.gather(1, index[..., None].expand(-1, -1, DIM)), v.gather(1, index[..., None].expand(-1, -1, DIM))
    if name == "Ada-SnapKV":  # one budget over the heads, each head first gets a floor of α·keep (Ada-KV's safeguard)
        scores = snapkv_scores(k, q_window)
        floor = int(0.2 * keep)
        top = scores.topk(floor, dim=-1).indices
        boosted = scores.scatter(1, top, float("inf"))
        chosen = boosted.flatten().topk(KV_HEADS * keep).indices.sort().values  # head-major, token order
        # the ragged result as kvpress-style flat rows (head h's tokens contiguous): one gather, no host sync
        return k.flatten(0, 1)[chosen], v.flatten(0, 1)[chosen]
    # RazorAttention: the retrieval head whole; the others sinks + one compensation token (the mean of what is
    # dropped) + the recent window
    keys, values = [], []
    for h in range(KV_HEADS):
        if h == RETRIEVAL_HEAD:
            keys.append(k[h]), values.append(v[h])
            continue
        dropped = slice(SINKS, TOKENS - others)
        keys.append(torch.cat((k[h, :SINKS], k[h, dropped].float().mean(0, keepdim=True).half(), k[h, TOKENS - others:])))
        values.append(torch.cat((v[h, :SINKS], v[h, dropped].float().mean(0, keepdim=True).half(), v[h, TOKENS - others:])))
    return keys, values


def gpu_time(call, repeats=20):
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return float(np.median(times))


# ---- the table ---------------------------------------------------------------------------------------------------


def relative_error(got, want, retrieval):
    heads = [j for j in range(Q_HEADS) if (j // GROUP == RETRIEVAL_HEAD) == retrieval]
    g, w = got[0, heads].astype(np.float64), want[0, heads].astype(np.float64)
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


def full_attention(k, v, q):
    kk = k[0].float().repeat_interleave(GROUP, 0)
    vv = v[0].float().repeat_interleave(GROUP, 0)
    p = torch.softmax(torch.einsum("hd,htd->ht", q[0].float(), kk) / math.sqrt(DIM), -1)
    return torch.einsum("ht,htd->hd", p, vv)[None].cpu().numpy()


def main():
    if not (kvtrim.has_cuda and torch.cuda.is_available()):
        print("demo (GPU part): skipped — needs a GPU, torch and kvtrim built with CUDA (KVTRIM_CUDA=ON pip install .)")
        return 0
    started = time.time()
    keys, values, window, queries = make_layer()
    k, v, qw, q = (torch.from_numpy(a).cuda() for a in (keys, values, window, queries))
    full = full_attention(k, v, q)
    shape = (Q_HEADS, KV_HEADS, DIM)
    print(f"\nkvtrim demo, GPU part ({torch.cuda.get_device_name()}): the same layer built with NumPy's generator, "
          f"compressed by kvtrim's CUDA backend (flat layout, fp16) and, from the same fp16 inputs, its CPU backend.")
    print("same: every head's kept set identical on CPU and CUDA; error: as above, CUDA's attention; µs: compress of "
          "one layer, kvtrim CUDA vs the policy in torch (median of 20)\n")
    print(f"{'kept':>5} | {'policy':14} | {'KiB':>6} {'error':>7} {'[retr]':>7} | {'same':>4} | "
          f"{'kvtrim µs':>9} {'torch µs':>9} {'×':>5}")
    rows = 0
    for fraction in FRACTIONS:
        chosen, keep, others = presses(fraction)
        for name, press in chosen.items():
            if press is None:
                print(f"{fraction:5.0%} | {name:14} | {'(below 1/8: the retrieval head alone keeps 1/8)':>40}")
                continue
            capacity = KV_HEADS * TOKENS
            gpu = kvtrim.Cache(press, kvtrim.FP16(), "flat", shape, 1, capacity, device="cuda")
            cpu = kvtrim.Cache(press, kvtrim.FP16(), "flat", shape, 1, capacity)
            needs = press.window_queries != 0
            gpu.compress(k, v, qw if needs else None)
            cpu.compress(keys, values, window if needs else None)
            same = all(np.array_equal(a, b) for a, b in zip(gpu.kept(), cpu.kept()))
            out = gpu.attend(q).float().cpu().numpy()
            held = gpu.stats()["total_bytes"]
            # compress replaces what the cache held (scheme.hpp), so the same cache is compressed again each call;
            # the time includes the Python binding's call (~20 µs, bench/python_overhead.py)
            kvtrim_us = gpu_time(lambda: gpu.compress(k, v, qw if needs else None))
            torch_us = gpu_time(lambda: torch_policy(name, k, v, qw, keep, others))
            print(f"{fraction:5.0%} | {name:14} | {held / 1024:6.0f} {relative_error(out, full, False):7.4f} "
                  f"{relative_error(out, full, True):7.4f} | {'yes' if same else 'NO':>4} | {kvtrim_us:9.1f} "
                  f"{torch_us:9.1f} {torch_us / kvtrim_us:5.1f}")
            rows += 1
    print(f"\n{rows} rows in {time.time() - started:.1f} s. Torch's gather builds new tensors; kvtrim writes the kept "
          f"tokens into its own cache (the flat layout's pool), ready for its decode attention.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
