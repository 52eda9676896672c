#!/usr/bin/env python3
"""torch's way to attend over a quantized cache: dequantize it to fp16, then
torch.nn.functional.scaled_dot_product_attention(enable_gqa=True) — the peer of
bench/cuda_decode_attention.cu's codec_decode rows (issue 12). Same storage as
kvtrim's codecs on workload W: int8 / int4 codes with KIVI's per-channel key
scales per group of 32 tokens (zero points for codec 2 and 3) and per-token
value scales, fp8 e4m3 codes with one scale per head. Timed like
bench/torch_sdpa.py: CUDA events around dequantize + SDPA, the L2 flushed before each
(bench/l2_flush.py), median of 50.
Prints JSON: [{"codec", "batch", "tokens", "q_heads", "kv_heads", "head_dim", "median_us", ...}]."""
import json
import sys

import torch
import torch.nn.functional as F

from l2_flush import MODE as FLUSH_MODE, L2Flush

SHAPES = [(8, 32768, 32, 8, 128), (8, 32768, 16, 8, 128)]
GROUP = 32


def make_cache(codec, batch, tokens, kv_heads, head_dim, device):
    shape = (batch, kv_heads, tokens, head_dim)
    if codec == "fp16":
        return {"k": torch.randn(shape, device=device, dtype=torch.float16),
                "v": torch.randn(shape, device=device, dtype=torch.float16)}
    if codec == "fp8":
        return {"k": torch.randn(shape, device=device).to(torch.float8_e4m3fn),
                "v": torch.randn(shape, device=device).to(torch.float8_e4m3fn),
                "ks": torch.rand(batch, kv_heads, 1, 1, device=device, dtype=torch.float16),
                "vs": torch.rand(batch, kv_heads, 1, 1, device=device, dtype=torch.float16)}
    bits = 8 if codec.startswith("int8") else 4
    width = head_dim * bits // 8
    cache = {"k": torch.randint(0, 256, (batch, kv_heads, tokens, width), device=device, dtype=torch.uint8),
             "v": torch.randint(0, 256, (batch, kv_heads, tokens, width), device=device, dtype=torch.uint8),
             "ks": torch.rand(batch, kv_heads, tokens // GROUP, 1, head_dim, device=device, dtype=torch.float16),
             "vs": torch.rand(batch, kv_heads, tokens, 1, device=device, dtype=torch.float16),
             "bits": bits, "zero": codec.endswith("zero_point")}
    if cache["zero"]:
        cache["kz"] = torch.rand_like(cache["ks"])
        cache["vz"] = torch.rand_like(cache["vs"])
    return cache


def unpack(codes, bits):
    if bits == 8:
        return codes
    low, high = codes & 0xF, codes >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(codec, cache):
    if codec == "fp16":
        return cache["k"], cache["v"]
    if codec == "fp8":
        return cache["k"].to(torch.float16) * cache["ks"], cache["v"].to(torch.float16) * cache["vs"]
    bits, zero = cache["bits"], cache["zero"]
    offset = 0 if zero else 1 << (bits - 1)
    k = unpack(cache["k"], bits).to(torch.float16) - offset
    v = unpack(cache["v"], bits).to(torch.float16) - offset
    b, h, t, d = k.shape
    k = k.view(b, h, t // GROUP, GROUP, d) * cache["ks"]
    if zero:
        k = k + cache["kz"]
    v = v * cache["vs"]
    if zero:
        v = v + cache["vz"]
    return k.view(b, h, t, d), v


def time_codec(codec, batch, tokens, q_heads, kv_heads, head_dim, repetitions=50):
    device = "cuda"
    q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=torch.float16)
    cache = make_cache(codec, batch, tokens, kv_heads, head_dim, device)
    flush = L2Flush(device)

    def run():
        k, v = dequantize(codec, cache)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for _ in range(3):
        run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repetitions):
        flush()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    times.sort()
    median = times[len(times) // 2]
    stored = sum(t.numel() * t.element_size() for t in cache.values() if isinstance(t, torch.Tensor))
    return {"codec": codec, "batch": batch, "tokens": tokens, "q_heads": q_heads, "kv_heads": kv_heads,
            "head_dim": head_dim, "median_us": median * 1e6, "stored_bytes": stored,
            "torch": torch.__version__, "device": torch.cuda.get_device_name(), "flush": FLUSH_MODE}


if __name__ == "__main__":
    codecs = ["fp16", "int8", "int8_zero_point", "int4_zero_point", "int4", "fp8"]
    json.dump([time_codec(codec, *shape) for shape in SHAPES for codec in codecs], sys.stdout, indent=1)
