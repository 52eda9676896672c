#!/usr/bin/env python3
"""Peers of bench/cuda_compress.cu at workload W (issue 10): batch 8, 32 query
heads, 8 kv heads, head dim 128, fp16, 32k tokens, keep 30%, SnapKV's
observation window 64 and pooling kernel 5.

Rows (CUDA events around each call, the L2 flushed (bench/l2_flush.py) first, median):
  torch_snapkv_compress      SnapKV in plain torch, kvpress's math: window
                             attention (repeat_kv, fp32 softmax), mean over the
                             window, avg_pool1d, mean over the group, window
                             kept, topk per head, gather of K and V
  torch_topk_gather          the same topk + gather alone, on given scores
  torch_adakv_counts         Ada-KV's selection on given scores, kvpress's form
                             (topk of the floor, scatter, bottom-k across heads)
  kvpress_snapkv_compress    kvpress 0.5.4's SnapKVPress.compress (its own code)
  kvpress_adakv_compress     kvpress's AdaKVPress(SnapKVPress).compress (scores
                             and the cross-head selection; kvpress masks instead
                             of compacting, so no gather)
The kvpress rows run when kvpress imports: pass --kvpress-wheel (the wheel is
unpacked and imported without running kvpress/__init__.py, which pulls in
datasets/accelerate; the presses need torch and transformers only).

Prints JSON: [{"row", "median_us", ...}].
"""
import argparse
import json
import math
import os
import sys
import tempfile
import types
import zipfile

import torch
import torch.nn.functional as F

from l2_flush import MODE as FLUSH_MODE, L2Flush

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM, TOKENS, KEEP, WINDOW, KERNEL = 8, 32, 8, 128, 32768, 0.3, 64, 5


def timed(call, repetitions=20):
    flush = L2Flush("cuda")
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repetitions):
        flush()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    times.sort()
    return times[len(times) // 2]


def snapkv_scores(queries, keys):
    """kvpress SnapKVPress.score's math (RoPE = identity): [B, H_kv, T]."""
    group = Q_HEADS // KV_HEADS
    k_len = keys.shape[2]
    k = keys.repeat_interleave(group, dim=1)
    weights = torch.matmul(queries, k.transpose(2, 3)) / math.sqrt(HEAD_DIM)
    mask = torch.triu(torch.full_like(weights, float("-inf")), diagonal=k_len - WINDOW + 1)
    weights = torch.softmax(weights + mask, dim=-1, dtype=torch.float32).to(queries.dtype)[..., :-WINDOW]
    scores = F.avg_pool1d(weights.mean(dim=-2), kernel_size=KERNEL, padding=KERNEL // 2, stride=1)
    scores = scores.view(BATCH, KV_HEADS, group, k_len - WINDOW).mean(2)
    return F.pad(scores, (0, WINDOW), value=float("inf"))


def topk_gather(scores, keys, values, kept):
    indices = scores.topk(kept, dim=-1).indices.sort(dim=-1).values
    gather = indices.unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)
    return keys.gather(2, gather).contiguous(), values.gather(2, gather).contiguous()


def adakv_counts(scores, kept, alpha=0.2):
    scores = scores.clone()
    safe = int(kept * alpha)
    scores.scatter_(-1, torch.topk(scores, safe, dim=-1).indices, torch.finfo(scores.dtype).max)
    pruned = KV_HEADS * (TOKENS - kept)
    return torch.topk(-scores.reshape(BATCH, -1), pruned, dim=1).indices


def import_kvpress(wheel):
    root = tempfile.mkdtemp()
    zipfile.ZipFile(wheel).extractall(root)
    for name, path in (("kvpress", "kvpress"), ("kvpress.presses", "kvpress/presses")):
        package = types.ModuleType(name)  # a bare package: its __init__ imports every press
        package.__path__ = [os.path.join(root, path)]
        sys.modules[name] = package
    from kvpress.presses.adakv_press import AdaKVPress
    from kvpress.presses.snapkv_press import SnapKVPress
    return SnapKVPress, AdaKVPress


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kvpress-wheel", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    keys = torch.randn(BATCH, KV_HEADS, TOKENS, HEAD_DIM, device="cuda", dtype=torch.float16)
    values = torch.randn_like(keys)
    queries = torch.randn(BATCH, Q_HEADS, WINDOW, HEAD_DIM, device="cuda", dtype=torch.float16)
    kept = int(TOKENS * KEEP)
    scores = snapkv_scores(queries, keys).float()
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "flush": FLUSH_MODE, "batch": BATCH, "q_heads": Q_HEADS,
            "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "tokens": TOKENS, "keep": KEEP}
    rows = [
        {"row": "torch_snapkv_compress",
         "median_us": timed(lambda: topk_gather(snapkv_scores(queries, keys), keys, values, kept))},
        {"row": "torch_topk_gather", "median_us": timed(lambda: topk_gather(scores, keys, values, kept))},
        {"row": "torch_adakv_counts", "median_us": timed(lambda: adakv_counts(scores, kept))},
    ]
    if args.kvpress_wheel:
        try:
            SnapKVPress, AdaKVPress = import_kvpress(args.kvpress_wheel)
            module = torch.nn.Module()
            module.config = types.SimpleNamespace(num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS,
                                                  num_hidden_layers=1, _attn_implementation="sdpa")
            module.head_dim, module.layer_idx, module.q_proj = HEAD_DIM, 0, torch.nn.Identity()
            # q_proj = identity: hidden states are the queries; only the last window is read.
            hidden = torch.zeros(BATCH, TOKENS, Q_HEADS * HEAD_DIM, device="cuda", dtype=torch.float16)
            hidden[:, -WINDOW:] = queries.transpose(1, 2).reshape(BATCH, WINDOW, Q_HEADS * HEAD_DIM)
            ones = torch.ones(BATCH, TOKENS, HEAD_DIM, device="cuda", dtype=torch.float16)
            kwargs = {"position_embeddings": (ones, torch.zeros_like(ones))}
            snap = SnapKVPress(compression_ratio=1 - KEEP, window_size=WINDOW, kernel_size=KERNEL)
            ada = AdaKVPress(press=SnapKVPress(compression_ratio=1 - KEEP, window_size=WINDOW, kernel_size=KERNEL))
            rows.append({"row": "kvpress_snapkv_compress",
                         "median_us": timed(lambda: snap.compress(module, hidden, keys, values, None, kwargs))})
            rows.append({"row": "kvpress_adakv_compress",
                         "median_us": timed(lambda: ada.compress(module, hidden, keys, values, None, kwargs))})
            info["kvpress"] = "0.5.4"
            import transformers
            info["transformers"] = transformers.__version__
        except Exception as failure:  # report, keep the torch rows
            info["kvpress_error"] = f"{type(failure).__name__}: {failure}"
    json.dump({"info": info, "rows": rows}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
