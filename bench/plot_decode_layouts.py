#!/usr/bin/env python3
"""Decode attention time vs tokens per layout, next to the peers (docs/img/decode_layouts.png).

Reads bench_cuda_decode_attention's Google Benchmark JSON (the W rows: batch 8,
32 q heads, 8 kv heads, head dim 128, fp16, every head full), torch_sdpa.py's
JSON and, when given, bench_peer_flashinfer_decode's JSON (rows whose names
start with "flashinfer"), all from one device run. Left: median µs per call vs
tokens per sequence (log-log). Right: the cache's bytes per second as a
fraction of the device-to-device copy bandwidth measured in the same run.

usage: plot_decode_layouts.py decode.json torch.json [flashinfer.json] -o out.png
"""
import argparse
import json
from collections import defaultdict

W = {"batch": 8, "q_heads": 32, "kv_heads": 8, "head_dim": 128}


def fields(name):
    """Google Benchmark's 'row/arg:value/…' name as a dict of ints (non-numeric parts dropped)."""
    out = {}
    for part in name.split("/")[1:]:
        if ":" in part:
            key, value = part.split(":", 1)
            try:
                out[key] = int(value)
            except ValueError:
                pass
    return out


def is_w(f):
    return all(f.get(key) == value for key, value in W.items())


def kvtrim_series(benchmarks):
    """layout label → {tokens: (µs, fraction of copy)} for W with every head full."""
    series = defaultdict(dict)
    for b in benchmarks:
        row, f = b["name"].split("/")[0], fields(b["name"])
        if not is_w(f) or "median_us" not in b:
            continue
        if row == "decode_attention":
            label = "kvtrim contiguous"
        elif row == "decode_attention_paged" and f.get("lengths") == 0 and f.get("page") == 16 and f.get("scattered") == 1:
            label = "kvtrim paged (per-head tables, pages of 16)"
        elif row == "decode_attention_flat" and f.get("lengths") == 0:
            label = "kvtrim flat"
        elif (row == "decode_attention_shared_paged" and f.get("page") == 16 and f.get("hnd") == 0
              and f.get("scattered") == 1):
            label = "kvtrim shared_paged (engine's NHD pages of 16)"
        else:
            continue
        series[label][f["tokens"]] = (b["median_us"], b.get("fraction_of_copy"))
    return series


def peer_series(benchmarks, copy_tbps):
    """bench_peer_flashinfer_decode's rows (W's shape; its names carry no head_dim): FlashInfer's and kvtrim's
    shared_paged decode on the same pages in that run, pages of 16, NHD — one series per row name."""
    series = defaultdict(dict)
    for b in benchmarks:
        row, f = b["name"].split("/")[0], fields(b["name"])
        if row not in ("flashinfer_batch_decode", "kvtrim_shared_paged_decode") or "tokens" not in f:
            continue
        if any(f.get(key) != value for key, value in W.items() if key != "head_dim") or "median_us" not in b:
            continue
        if f.get("page") != 16 or f.get("hnd") != 0:
            continue
        rest = "FlashInfer's run: the same NHD pages of 16"
        fraction = b.get("fraction_of_copy")
        if fraction is None and copy_tbps and "cache_TBps" in b:
            fraction = b["cache_TBps"] / copy_tbps
        label = "FlashInfer 0.7.4 batch decode" if row.startswith("flashinfer") else "kvtrim shared_paged"
        series[f"{label} ({rest})"][f["tokens"]] = (b["median_us"], fraction)
    return series


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("decode_json")
    parser.add_argument("torch_json")
    parser.add_argument("flashinfer_json", nargs="?")
    parser.add_argument("-o", "--output", default="decode_layouts.png")
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = json.load(open(args.decode_json))
    copy = [b for b in decode["benchmarks"] if b["name"].startswith("device_copy")]
    copy_tbps = copy[0].get("copy_TBps") if copy else None
    series = kvtrim_series(decode["benchmarks"])
    torch_rows = json.load(open(args.torch_json))
    torch_label = f"torch {torch_rows[0]['torch']} SDPA (contiguous)"
    for row in torch_rows:
        if is_w(row):
            fraction = row["cache_TBps"] / copy_tbps if copy_tbps else None
            series[torch_label][row["tokens"]] = (row["median_us"], fraction)
    if args.flashinfer_json:
        series.update(peer_series(json.load(open(args.flashinfer_json))["benchmarks"], copy_tbps))

    figure, (time_axis, copy_axis) = plt.subplots(1, 2, figsize=(13, 6))
    for label, points in sorted(series.items()):
        tokens = sorted(t for t in points if t & (t - 1) == 0)  # the sweep (powers of two), not the 30 % rows
        peer = not label.startswith("kvtrim") or "FlashInfer's run" in label
        style = dict(marker="s" if peer else "o", linestyle="--" if peer else "-")
        time_axis.plot(tokens, [points[t][0] for t in tokens], label=label, **style)
        fractions = [(t, points[t][1]) for t in tokens if points[t][1] is not None]
        if fractions:
            copy_axis.plot([t for t, _ in fractions], [100 * f for _, f in fractions], label=label, **style)
    for axis in (time_axis, copy_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("tokens per sequence (every kv head full)")
        axis.grid(True, which="both", alpha=0.3)
    time_axis.set_yscale("log")
    time_axis.set_ylabel("decode attention, median µs per call")
    copy_axis.set_ylabel(f"cache bytes/s, % of the measured copy ({copy_tbps:.2f} TB/s)" if copy_tbps else "% of copy")
    copy_axis.axhline(100, color="grey", linewidth=0.8)
    handles, labels = time_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    device = torch_rows[0].get("device", "GPU")
    figure.suptitle(f"Decode attention, fp16, batch 8 × 32 q heads / 8 kv heads × head dim 128 — {device}")
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    figure.savefig(args.output, dpi=110)
    for label, points in sorted(series.items()):
        print(label, {t: round(points[t][0], 1) for t in sorted(points)})


if __name__ == "__main__":
    main()
