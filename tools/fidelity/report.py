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


def model_section(data):
    m, t = data["model"], data.get("training", {})
    corpus = t.get("corpus", data.get("corpus", {}))
    lines = ["| | |", "|---|---|",
             f"| shape | {m['layers']} layers, width {m['width']}, {m['q_heads']} query heads over {m['kv_heads']} kv heads "
             f"of {m['head_dim']}, SwiGLU {m['mlp']}, RoPE base {m['rope_base']:g}, byte vocabulary ({m['vocab']}) |"]
    if t:
        lines += [f"| parameters | {t['parameters'] / 1e6:.2f} M |",
                  f"| training | {t['steps_run']} steps of {t['args']['batch']} × {t['args']['seq']} bytes "
                  f"({t['tokens_seen'] / 1e6:.0f} M bytes), AdamW lr {t['args']['lr']:g} cosine, bf16 autocast, "
                  f"seed {t['args']['seed']}, {t['seconds']:.0f} s on {t.get('gpu') or t['device']}"
                  + (" — stopped early by its time guard" if t.get("stopped_early") else "") +
                  (f", needle format planted in {t['args'].get('needle_mix', 0):.0%} of windows"
                   if t["args"].get("needle_mix") else "") + " |",
                  f"| held-out bits per byte | {t['final_held_out_bits_per_byte']:.3f} "
                  f"(train curve: [img/fidelity-training.png](img/fidelity-training.png)) |"]
    if corpus:
        lines.append(f"| text | {corpus['files']} Python files installed on the GPU machine; "
                     f"{corpus.get('train_bytes', 0) / 1e6:.0f} MB for training, {corpus['held_out_files']} files "
                     f"({corpus['held_out_bytes'] / 1e6:.1f} MB) held out; list sha256 `{corpus['list_sha256'][:16]}…` |")
    razor = data.get("razor", {})
    if razor:
        heads = [f"layer {l} kv head {h}" for l, flags in enumerate(razor["retrieval_heads"])
                 for h, flag in enumerate(flags) if flag]
        kv = m["kv_heads"]
        scores = ", ".join(f"L{i // kv}h{i % kv} {x:.2f}" for i, x in enumerate(razor["induction"]))
        lines.append(f"| RazorAttention calibration | kvtrim's probe ({razor['probe']['block']} random printable bytes × "
                     f"{razor['probe']['repeats']}), top 14% by induction ∪ top 1% by echo: {', '.join(heads)}. "
                     f"Induction scores: {scores} |")
    return "\n".join(lines)


def missing_section(data):
    lines = [f"- {m}" for m in data.get("missing", [])]
    checks = [c for c in data.get("cuda_checks", []) if "setup" in c]
    if checks:
        ok = [c for c in checks if c.get("kept_sets_identical")]
        worst = max((c.get("attend_max_abs_difference", 0.0) for c in ok), default=0.0)
        names = sorted({c["setup"] for c in checks})
        lines.append(f"- CPU against CUDA: {len(checks)} configurations whose scheme is compiled for CUDA "
                     f"({', '.join(names)}) were compressed on both from the same fp16 inputs: kept sets identical "
                     f"in {len(ok)} of {len(checks)}, decode attention within {worst:.1e}. The table itself is the "
                     f"CPU backend's (the GPU path lacks read-back for the continuation).")
        for c in checks:
            if "error" in c:
                lines.append(f"  - {c['setup']} {c['fraction']:.0%}: {c['error']}")
    elif data.get("cuda_checks"):
        lines.append(f"- CPU against CUDA: {data['cuda_checks'][0].get('skipped', 'not run')}")
    return "\n".join(lines)


def replace(doc, marker, text):
    return re.sub(rf"<!-- {marker} -->.*?<!-- /{marker} -->", lambda m: f"<!-- {marker} -->\n{text}\n<!-- /{marker} -->",
                  doc, flags=re.S)


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
        before = doc
        doc = replace(doc, "tables", table)
        doc = replace(doc, "model", model_section(data))
        doc = replace(doc, "missing", missing_section(data))
        if doc != before:
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
