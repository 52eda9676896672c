"""Trains the fidelity model (tools/model/model.py) on the installed Python sources (tools/model/data.py).

    python3 tools/model/train.py --out .model            # on the GPU machine: 1800 steps, ~2.7 minutes on one H200
    python3 tools/model/train.py --out .model --tiny     # a CPU smoke run (1 layer, a few steps)

Fixed seeds, a fixed number of steps (--max-seconds only stops a run that would
overrun its device call, and says so in the log). Writes to --out (git-ignored):
model.pt (the state dict), config.json, train.json (the loss curve, held-out
bits per byte, the corpus description, seconds). Prints the loss curve as it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_corpus  # noqa: E402
from model import Config, Decoder  # noqa: E402


def held_out_bits_per_byte(model, held, seq, device, windows=64, seed=7):
    """Mean cross-entropy (bits) of the last half of `windows` held-out windows of `seq` bytes."""
    rng = np.random.default_rng(seed)
    texts = [t for t in held if len(t) > seq + 1]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, windows, 16):
            batch = []
            for i in range(start, min(windows, start + 16)):
                text = texts[int(rng.integers(len(texts)))]
                at = int(rng.integers(0, len(text) - seq - 1))
                batch.append(np.frombuffer(text[at:at + seq + 1], dtype=np.uint8))
            x = torch.from_numpy(np.stack(batch).astype(np.int64)).to(device)
            logits = model(x[:, :-1]).float()
            loss = F.cross_entropy(logits[:, seq // 2:].reshape(-1, logits.shape[-1]), x[:, 1 + seq // 2:].reshape(-1),
                                   reduction="sum")
            total += loss.item()
            count += x[:, 1 + seq // 2:].numel()
    model.train()
    return total / count / math.log(2)


def plant_needles(x, fraction, generator):
    """Writes, into a `fraction` of the windows x [B, L+1], four KEY_xy = "value" lines early and one recall later."""
    letters, alphabet = b"ABCDEFGH", b"abcdefghijklmnopqrstuvwxyz0123456789"
    length = x.shape[1]
    for row in np.nonzero(generator.random(x.shape[0]) < fraction)[0]:
        names = [b"KEY_" + bytes([letters[i // 8], letters[i % 8]]) for i in generator.choice(64, 4, replace=False)]
        values = [bytes(alphabet[j] for j in generator.integers(0, len(alphabet), 8)) for _ in names]
        block = b"\n" + b"".join(n + b' = "' + v + b'"\n' for n, v in zip(names, values))
        asked = int(generator.integers(4))
        recall = b"\n" + names[asked] + b' = "' + values[asked] + b'"\n'
        at = int(generator.integers(0, length // 3))
        later = int(generator.integers(at + len(block) + 64, length - len(recall)))
        for where, text in ((at, block), (later, recall)):
            x[row, where:where + len(text)] = torch.tensor(list(text), dtype=x.dtype, device=x.device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".model")
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=2304)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=1e9)
    parser.add_argument("--tiny", action="store_true", help="1 layer, short sequences, a few steps (a CPU smoke run)")
    parser.add_argument("--needle-mix", type=float, default=0.15,
                        help="fraction of training windows given a KEY_xy = \"...\" block and a later recall of one key "
                             "(the needle task's format, so the full model can do the task; 0: the model learns copying from code alone)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    config = Config(context=args.seq)
    corpus_bytes = 160 << 20
    if args.tiny:
        config = Config(layers=2, width=128, mlp=256, context=256)
        args.steps, args.batch, args.seq, args.warmup = min(args.steps, 30), 8, 256, 5
        corpus_bytes = 4 << 20
    started = time.time()
    corpus = load_corpus(corpus_bytes)
    print(f"corpus: {corpus.describe()} ({time.time() - started:.1f} s)", flush=True)

    model = Decoder(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {config.to_dict()}, {params / 1e6:.2f} M parameters, device {device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    schedule = lambda step: min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps))))  # noqa: E731

    train = torch.from_numpy(corpus.train).to(device)
    generator = np.random.default_rng(args.seed)
    offsets = torch.arange(args.seq + 1, device=device)
    curve, evals = [], []
    started = time.time()
    step = 0
    stopped_early = False
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * schedule(step)
        starts = torch.from_numpy(generator.integers(0, train.numel() - args.seq - 1, args.batch)).to(device)
        x = train[starts[:, None] + offsets].long()
        if args.needle_mix > 0:
            plant_needles(x, args.needle_mix, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, config.vocab), x[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            value = loss.item() / math.log(2)
            curve.append({"step": step, "bits_per_byte": round(value, 4), "seconds": round(time.time() - started, 1)})
            print(f"step {step:5d}  train {value:.3f} bits/byte  {time.time() - started:6.1f} s", flush=True)
        if (step + 1) % 250 == 0:
            bpb = held_out_bits_per_byte(model, corpus.held_out, min(args.seq, 1024), device, windows=32)
            evals.append({"step": step + 1, "held_out_bits_per_byte": round(bpb, 4)})
            print(f"step {step + 1:5d}  held-out {bpb:.3f} bits/byte", flush=True)
        if time.time() - started > args.max_seconds:
            stopped_early = True
            print(f"stopped at step {step + 1} of {args.steps}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    seconds = time.time() - started
    final = held_out_bits_per_byte(model, corpus.held_out, args.seq, device, windows=64)
    print(f"done: {step + 1} steps, {seconds:.0f} s, held-out {final:.3f} bits/byte at {args.seq} bytes", flush=True)

    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.out, "model.pt"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=1)
    with open(os.path.join(args.out, "train.json"), "w") as f:
        json.dump({"config": config.to_dict(), "parameters": params, "args": vars(args), "corpus": corpus.describe(),
                   "steps_run": step + 1, "stopped_early": stopped_early, "seconds": round(seconds, 1),
                   "tokens_seen": (step + 1) * args.batch * args.seq, "curve": curve, "held_out": evals,
                   "final_held_out_bits_per_byte": round(final, 4), "device": str(device),
                   "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                   "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
