#!/usr/bin/env python3
"""Joins bench_cuda_decode_attention's JSON with torch_sdpa.py's and prints a
markdown table: kvtrim vs torch SDPA per shape, and the speed ratio."""
import json
import sys

kvtrim_json, torch_json = sys.argv[1], sys.argv[2]
kvtrim = json.load(open(kvtrim_json))
torch_rows = json.load(open(torch_json))
copy = [b for b in kvtrim["benchmarks"] if b["name"].startswith("device_copy")]
copy_tbps = copy[0]["copy_TBps"] if copy else float("nan")
print(f"device: {torch_rows[0]['device']}, torch {torch_rows[0]['torch']}, measured D2D copy {copy_tbps:.2f} TB/s")
print("| batch | tokens | q heads | kv heads | head dim | kvtrim µs | kvtrim TB/s | % of copy | torch µs | torch TB/s | kvtrim speed / torch |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row in torch_rows:
    key = (f"batch:{row['batch']}/tokens:{row['tokens']}/q_heads:{row['q_heads']}/kv_heads:{row['kv_heads']}/"
           f"head_dim:{row['head_dim']}/")
    match = [b for b in kvtrim["benchmarks"] if key in b["name"]]
    if not match:
        continue
    ours = match[0]
    print(f"| {row['batch']} | {row['tokens']} | {row['q_heads']} | {row['kv_heads']} | {row['head_dim']} | "
          f"{ours['median_us']:.1f} | {ours['cache_TBps']:.2f} | {100 * ours.get('fraction_of_copy', float('nan')):.1f} | "
          f"{row['median_us']:.1f} | {row['cache_TBps']:.2f} | {row['median_us'] / ours['median_us']:.2f}× |")

