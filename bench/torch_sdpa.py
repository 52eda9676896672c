#!/usr/bin/env python3
"""torch.nn.functional.scaled_dot_product_attention(enable_gqa=True) on the
shapes of bench/cuda_decode_attention.cu: one fp16 query per head against a
[batch, kv_heads, tokens, head_dim] cache. Timed like the C++ benchmark: CUDA
events around each call, the L2 flushed (bench/l2_flush.py) before each, median of 50.
Prints JSON: [{"batch", "tokens", "q_heads", "kv_heads", "head_dim", "median_us", "cache_TBps"}]."""
import json
import sys

import torch
import torch.nn.functional as F

from l2_flush import MODE as FLUSH_MODE, L2Flush

SHAPES = [(8, 4096, 32, 8, 128), (8, 32768, 32, 8, 128), (1, 32768, 32, 8, 128),
          (8, 4096, 32, 32, 128), (8, 4096, 64, 8, 128), (8, 4097, 32, 8, 64),
          (8, 9830, 32, 8, 128),  # 30 % of a 32k cache, the bytes of bench's ragged / 30 % caches
          (8, 8192, 32, 8, 128), (8, 16384, 32, 8, 128), (8, 65536, 32, 8, 128)]  # W's time vs tokens


def time_sdpa(batch, tokens, q_heads, kv_heads, head_dim, repetitions=50):
    device = "cuda"
    q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=torch.float16)
    k = torch.randn(batch, kv_heads, tokens, head_dim, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    flush = L2Flush(device)
    for _ in range(3):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.cuda.synchronize()
    times = []
    for _ in range(repetitions):
        flush()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    times.sort()
    median = times[len(times) // 2]
    cache_bytes = 2 * k.numel() * k.element_size()
    return {"batch": batch, "tokens": tokens, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "median_us": median * 1e6, "cache_TBps": cache_bytes / median / 1e12,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(), "flush": FLUSH_MODE}


if __name__ == "__main__":
    json.dump([time_sdpa(*shape) for shape in SHAPES], sys.stdout, indent=1)
