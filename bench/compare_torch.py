#!/usr/bin/env python3
"""Joins bench_cuda_decode_attention's JSON with torch_sdpa.py's and prints
markdown tables: kvtrim vs torch SDPA per shape, and the speed ratio; then the
paged / flat rows against torch on the same bytes (and, for the ragged 30 %
cache, torch over the full 32k cache and kvtrim's uniform 30 % cache)."""
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


LENGTHS = {0: "full", 1: "uniform 30 %", 2: "ragged 5–90 %, mean 30 %"}
torch_by_tokens = {(r["batch"], r["tokens"], r["q_heads"], r["kv_heads"], r["head_dim"]): r for r in torch_rows}
print()
print("| layout | tokens | lengths | kvtrim µs | TB/s | % of copy | torch µs, same bytes | speed / torch | vs torch full cache | vs uniform 30 % |")
print("|---|---|---|---|---|---|---|---|---|---|")
ours_by_key = {}
for b in kvtrim["benchmarks"]:
    if not (b["name"].startswith("decode_attention_paged") or b["name"].startswith("decode_attention_flat")):
        continue
    fields = dict(part.split(":") for part in b["name"].split("/")[1:] if ":" in part)
    layout = b["name"].split("/")[0].replace("decode_attention_", "")
    if layout == "paged" and (fields.get("scattered") == "0" or fields.get("page") != "16"):
        layout = f"paged {fields['page']}" + (", pages in order" if fields.get("scattered") == "0" else "")
    key = (layout, int(fields["tokens"]), int(fields["lengths"]))
    ours_by_key[key] = b
for (layout, tokens, mode), b in sorted(ours_by_key.items()):
    same = 9830 if mode > 0 else tokens
    t_same = torch_by_tokens.get((8, same, 32, 8, 128))
    t_full = torch_by_tokens.get((8, tokens, 32, 8, 128))
    uniform = ours_by_key.get((layout, tokens, 1))
    vs_full = f"{b['median_us'] / t_full['median_us']:.2f}× time" if (t_full and mode > 0) else ""
    vs_uniform = f"{b['median_us'] / uniform['median_us']:.2f}× time" if (uniform and mode == 2) else ""
    print(f"| {layout} | {tokens} | {LENGTHS[mode]} | {b['median_us']:.1f} | {b['cache_TBps']:.2f} | "
          f"{100 * b.get('fraction_of_copy', float('nan')):.1f} | "
          f"{t_same['median_us']:.1f} | {t_same['median_us'] / b['median_us']:.2f}× | {vs_full} | {vs_uniform} |"
          if t_same else f"| {layout} | {tokens} | {LENGTHS[mode]} | {b['median_us']:.1f} | {b['cache_TBps']:.2f} | | | | | |")
