"""Turns the study's JSON into docs/fidelity.md's tables and the PNG plots of docs/img/.

    python3 tools/fidelity/report.py docs/fidelity-results.json [--doc docs/fidelity.md] [--img docs/img]

The tables replace what stands between <!-- tables --> and <!-- /tables --> in the doc;
the plots need matplotlib (not the study: the GPU machine need not have it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import OrderedDict

ORDER = ["StreamingLLM", "H2O", "SnapKV", "Ada-SnapKV", "Pyramid-SnapKV", "key norm", "RazorAttention",
         "Ada-SnapKV + int8", "RazorAttention + int8"]


def rows_by_setup(data):
    """(setup, fraction) → {task: row}, in the order of the tables."""
    table = OrderedDict()
    for row in data["results"]:
        if "error" in row:
            continue
        table.setdefault((row["setup"], row["fraction"]), {})[row["task"]] = row
    def key(item):
        (setup, fraction), _ = item
        if setup.startswith("full"):
            return (0, 0, 0)
        if setup.startswith("kvtrim"):
            return (1, 0, setup)
        return (2, ORDER.index(setup) if setup in ORDER else 99, fraction)
    return OrderedDict(sorted(table.items(), key=key))


def markdown(data):
    fp16 = data["fp16_bytes_per_token"]
    lines = ["| configuration | asked | kept | bytes / token | of fp16 | lm accuracy | lm bits / byte | "
             "needle | needle (query-aware) | kvtrim attend vs read-back |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (setup, fraction), tasks in rows_by_setup(data).items():
        lm, needle, aware = tasks.get("lm"), tasks.get("needle"), tasks.get("aware")
        first = lm or needle or aware
        diff = max((t.get("attend_max_abs_difference", 0.0) for t in tasks.values()), default=0.0)
        cells = [setup, f"{fraction:.0%}", f"{first['kept_fraction']:.1%}", f"{first['bytes_per_token']:.0f}",
                 f"{first['bytes_per_token'] / fp16:.1%}",
                 f"{lm['accuracy']:.3f}" if lm else "", f"{lm['bits_per_byte']:.3f}" if lm else "",
                 f"{needle['success']:.0%} ({needle['accuracy']:.2f})" if needle else "",
                 f"{aware['success']:.0%} ({aware['accuracy']:.2f})" if aware else "",
                 "—" if setup.startswith("full") else f"{diff:.1e}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(data, directory):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    fp16 = data["fp16_bytes_per_token"]
    panels = [("lm", "bits_per_byte", "bits per byte (continuation), lower is better"),
              ("lm", "accuracy", "next-byte accuracy (continuation)"),
              ("needle", "success", "needle recalled (question after compression)"),
              ("aware", "success", "needle recalled (question in the prompt)")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=72)
    full = {r["task"]: r for r in data["results"] if r["family"] == "full"}
    for ax, (task, metric, title) in zip(axes.flat, panels):
        for family in ORDER:
            points = sorted((r["bytes_per_token"] / fp16, r[metric]) for r in data["results"]
                            if r["task"] == task and r["family"] == family and "error" not in r)
            if points:
                style = "--" if "int8" in family else "-"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=family)
        codecs = [r for r in data["results"] if r["task"] == task and r["family"] == "codec"]
        for r in codecs:
            ax.plot(r["bytes_per_token"] / fp16, r[metric], "k^", markersize=5)
        if task in full:
            ax.axhline(full[task][metric], color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("memory held, fraction of the fp16 cache")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"kvtrim on a {data['model']['layers']}-layer byte-level model, {data['prefix_bytes']}-byte prompts, "
                 f"{data['samples']} examples per task (dotted: full cache; triangles: codecs, every token)", fontsize=10)
    fig.tight_layout()
    path = os.path.join(directory, "fidelity-quality-vs-memory.png")
    fig.savefig(path)
    print("wrote", path)

    training = data.get("training")
    if training:
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=72)
        ax.plot([p["step"] for p in training["curve"]], [p["bits_per_byte"] for p in training["curve"]], label="train")
        held = training.get("held_out", [])
        if held:
            ax.plot([p["step"] for p in held], [p["held_out_bits_per_byte"] for p in held], "o-", label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.set_ylim(0, 4)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("training the fidelity model", fontsize=10)
        fig.tight_layout()
        path = os.path.join(directory, "fidelity-training.png")
        fig.savefig(path)
        print("wrote", path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--doc", default="docs/fidelity.md")
    parser.add_argument("--img", default="docs/img")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    table = markdown(data)
    if os.path.exists(args.doc):
        with open(args.doc) as f:
            doc = f.read()
        doc, n = re.subn(r"<!-- tables -->.*?<!-- /tables -->", lambda m: f"<!-- tables -->\n{table}\n<!-- /tables -->",
                         doc, flags=re.S)
        if n:
            with open(args.doc, "w") as f:
                f.write(doc)
            print("updated", args.doc)
        else:
            print(table)
    else:
        print(table)
    if not args.no_plots:
        plots(data, args.img)


if __name__ == "__main__":
    main()
