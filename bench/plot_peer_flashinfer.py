#!/usr/bin/env python3
# From bench_peer_flashinfer_decode's JSON (--benchmark_out): writes an SVG of decode time vs
# tokens per sequence, FlashInfer's BatchDecodeWithPagedKVCache (dashed) next to kvtrim's
# shared_paged decode (solid) on the same pages, one colour per page size and order; and
# prints the markdown table for docs/results.md (fp16 rows, then fp8 at 32k).
#   bench/plot_peer_flashinfer.py fi.json docs/img/peer_flashinfer.svg > table.md
import json
import math
import sys

bench = json.load(open(sys.argv[1]))["benchmarks"]
out = sys.argv[2]


def args_of(name):
    return {k: int(v) for k, v in (p.split(":") for p in name.split("/")[1:] if ":" in p and p.split(":")[1].isdigit())}


rows = {}  # (kind, tokens, page, hnd) -> benchmark entry
copy_tbps = None
for b in bench:
    if b.get("error_occurred"):
        continue
    kind = b["name"].split("/")[0]
    if kind == "device_copy":
        copy_tbps = b.get("copy_TBps")
        continue
    a = args_of(b["name"])
    rows[(kind, a["tokens"], a["page"], a["hnd"])] = b

# ---- the table ----
print(f"copy bandwidth measured in the same run: {copy_tbps:.2f} TB/s\n" if copy_tbps else "")
print("| tokens | page | order | FlashInfer µs | kvtrim µs | kvtrim speed / FlashInfer | FlashInfer % of copy | kvtrim % of copy | max abs diff |")
print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
for (kind, tokens, page, hnd), fi in sorted(rows.items(), key=lambda kv: kv[0][1:]):
    if kind != "flashinfer_batch_decode":
        continue
    kt = rows.get(("kvtrim_shared_paged_decode", tokens, page, hnd))
    if not kt:
        continue
    print(f"| {tokens} | {page} | {'HND' if hnd else 'NHD'} | {fi['median_us']:.1f} | {kt['median_us']:.1f} | "
          f"{fi['median_us'] / kt['median_us']:.2f}× | {100 * fi.get('fraction_of_copy', 0):.0f}% | "
          f"{100 * kt.get('fraction_of_copy', 0):.0f}% | {fi.get('max_abs_diff', float('nan')):.1e} |")
print("\n| fp8 e4m3 at 32k tokens | layout | µs | % of copy | max abs diff vs kvtrim fp16 |")
print("|---|---|---:|---:|---:|")
for (kind, tokens, page, hnd), b in sorted(rows.items()):
    if kind == "flashinfer_batch_decode_fp8":
        layout = f"FlashInfer pages of {page}, {'HND' if hnd else 'NHD'}, per-tensor scale"
    elif kind == "kvtrim_codec_decode_fp8":
        layout = "kvtrim contiguous fp8 codec, scale 1/448 every head"
    else:
        continue
    print(f"| {kind} | {layout} | {b['median_us']:.1f} | {100 * b.get('fraction_of_copy', 0):.0f}% | "
          f"{b.get('max_abs_diff', float('nan')):.1e} |")

# ---- the plot: µs vs tokens (log2 axis) ----
W, H, L, B, T, R = 640, 400, 70, 50, 30, 190
tokens_all = sorted({k[1] for k in rows if k[0] in ("flashinfer_batch_decode", "kvtrim_shared_paged_decode")})
if not tokens_all:
    sys.exit("no fp16 rows in the JSON")
times = [b["median_us"] for k, b in rows.items()]
xmin, xmax = math.log2(tokens_all[0]), math.log2(tokens_all[-1])
ymax = max(times) * 1.1


def x(t):
    return L + (W - L - R) * (math.log2(t) - xmin) / max(xmax - xmin, 1e-9)


def y(v):
    return H - B - (H - B - T) * v / ymax


svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{y(0)}" x2="{W - R}" y2="{y(0)}" stroke="black"/>',
       f'<line x1="{L}" y1="{y(0)}" x2="{L}" y2="{T}" stroke="black"/>',
       f'<text x="{(W - R + L) / 2}" y="{H - 12}" text-anchor="middle">tokens per sequence (batch 8, 32 q / 8 kv heads, D 128, fp16)</text>',
       f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">decode attention, median µs</text>']
for t in tokens_all:
    svg.append(f'<line x1="{x(t)}" y1="{y(0)}" x2="{x(t)}" y2="{y(0) + 4}" stroke="black"/>'
               f'<text x="{x(t)}" y="{y(0) + 16}" text-anchor="middle">{t // 1024}k</text>')
step = 10 ** math.floor(math.log10(ymax / 4))
step *= 5 if ymax / step > 20 else (2 if ymax / step > 8 else 1)
v = 0.0
while v <= ymax:
    svg.append(f'<line x1="{L - 4}" y1="{y(v)}" x2="{L}" y2="{y(v)}" stroke="black"/>'
               f'<text x="{L - 8}" y="{y(v) + 4}" text-anchor="end">{v:g}</text>')
    v += step
colors = {(16, 0): "#1f77b4", (16, 1): "#d62728", (64, 0): "#2ca02c", (64, 1): "#9467bd"}
legend_y = T
for (page, hnd), color in colors.items():
    for kind, dash, label in (("flashinfer_batch_decode", ' stroke-dasharray="5 3"', "FlashInfer"),
                              ("kvtrim_shared_paged_decode", "", "kvtrim")):
        pts = [(t, rows[(kind, t, page, hnd)]["median_us"]) for t in tokens_all if (kind, t, page, hnd) in rows]
        if not pts:
            continue
        svg.append(f'<polyline points="{" ".join(f"{x(t)},{y(us)}" for t, us in pts)}" fill="none" stroke="{color}"{dash}/>')
        svg.extend(f'<circle cx="{x(t)}" cy="{y(us)}" r="2.5" fill="{color}"/>' for t, us in pts)
        svg.append(f'<line x1="{W - R + 12}" y1="{legend_y}" x2="{W - R + 36}" y2="{legend_y}" stroke="{color}"{dash}/>'
                   f'<text x="{W - R + 42}" y="{legend_y + 4}">{label}, page {page}, {"HND" if hnd else "NHD"}</text>')
        legend_y += 16
svg.append("</svg>")
open(out, "w").write("\n".join(svg) + "\n")
print(f"\nwrote {out}", file=sys.stderr)
