#!/usr/bin/env python3
# Writes docs/img/codec_speedup.svg: decode speed-up over kvtrim fp16 vs bytes per token per head
# (W at 32k tokens), from bench_cuda_decode_attention's JSON.
import json, sys
bench = json.load(open(sys.argv[1]))["benchmarks"]
out = sys.argv[2]
rows = {}
for b in bench:
    name = b["name"]
    if not name.startswith("codec_decode_"): continue
    codec = name.split("/")[0][len("codec_decode_"):]
    if codec.endswith("fixed_scales"): continue  # fp8's decode again (only its encode differs)
    if "tokens:32768" not in name: continue
    q = int([p for p in name.split("/") if p.startswith("q_heads:")][0].split(":")[1])
    rows[(codec, q)] = (b["bytes_per_token_head"], b["median_us"])
W, H, L, B, T, R = 560, 360, 70, 50, 30, 30
xmax, ymax = 560.0, 4.0
def x(v): return L + (W - L - R) * v / xmax
def y(v): return H - B - (H - B - T) * v / ymax
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{y(0)}" x2="{W-R}" y2="{y(0)}" stroke="black"/>',
       f'<line x1="{L}" y1="{y(0)}" x2="{L}" y2="{T}" stroke="black"/>',
       f'<text x="{(W)/2}" y="{H-12}" text-anchor="middle">bytes stored per token per head (head_dim 128)</text>',
       f'<text x="14" y="{H/2}" transform="rotate(-90 14 {H/2})" text-anchor="middle">decode speed-up over kvtrim fp16</text>']
for v in range(0, 561, 80):
    svg.append(f'<line x1="{x(v)}" y1="{y(0)}" x2="{x(v)}" y2="{y(0)+4}" stroke="black"/><text x="{x(v)}" y="{y(0)+16}" text-anchor="middle">{v}</text>')
for v in [0, 1, 2, 3, 4]:
    svg.append(f'<line x1="{L-4}" y1="{y(v)}" x2="{L}" y2="{y(v)}" stroke="black"/><text x="{L-8}" y="{y(v)+4}" text-anchor="end">{v}×</text>')
# ideal: bytes-bound speed-up = 512 / bytes
pts = " ".join(f"{x(b)},{y(min(512.0/b, ymax))}" for b in range(128, 561, 8))
svg.append(f'<polyline points="{pts}" fill="none" stroke="#999" stroke-dasharray="4 3"/>')
svg.append(f'<text x="{x(140)}" y="{y(3.75)}" fill="#666">bandwidth-bound: 512 / bytes</text>')
colors = {32: "#1f77b4", 16: "#d62728"}
for (codec, q), (b, us) in sorted(rows.items()):
    base = rows.get(("fp16", q))
    if not base: continue
    s = base[1] / us
    svg.append(f'<circle cx="{x(b)}" cy="{y(s)}" r="4" fill="{colors.get(q, "black")}"/>')
    anchor = ' text-anchor="end"' if x(b) > 380 else ''
    dx = -6 if anchor else 6
    svg.append(f'<text x="{x(b)+dx}" y="{y(s)-6}"{anchor}>{codec} (GQA {q // 8}) {s:.2f}×</text>')
svg.append('</svg>')
open(out, "w").write("\n".join(svg))
print("wrote", out, rows)
