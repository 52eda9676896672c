#!/usr/bin/env python3
"""Compare kvtrim's kvpress-compatible configurations with kvpress itself.

For random inputs (fp32), run kvpress v0.5.4's presses (their own score and
selection code) and kvtrim's CPU reference (tests/kvpress/kvpress_driver), and
compare the kept token set of every (sequence, kv head).

Needs torch, transformers and kvpress (`pip install kvpress==0.5.4`); run it where
those exist (the GPU machine), after building kvpress_driver:

    cmake --preset cpu-release && cmake --build --preset cpu-release --target kvpress_driver
    python3 tests/kvpress/compare_kvpress.py --driver build/cpu-release/tests/kvpress_driver

How kvpress is driven: a mock attention module (config, head_dim, layer_idx,
q_proj = identity) lets SnapKVPress compute its own window attention from
hidden_states = the queries and RoPE = identity (cos 1, sin 0); eager attention
weights (for ObservedAttentionPress, and SnapKV's `attentions` path) are computed
here with torch in fp32. The values tensor carries each token's index in its
first channel, so the values kvpress's compress() returns name the kept tokens
(scores never read values). AdaKVPress reports its pruned tokens in
module.masked_key_indices; kept = the rest.

Exit status 0 when every kept set matches, or differs only by tokens whose
kvpress scores tie (within --tie-tolerance, relative) with the selection boundary
(torch.topk breaks ties in no stated order; kvtrim keeps the lower index).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import types

import torch
from torch import nn

from kvpress import (AdaKVPress, KnormPress, ObservedAttentionPress, PyramidKVPress, SnapKVPress,
                     StreamingLLMPress)


class MockAttention(nn.Module):
    def __init__(self, q_heads, kv_heads, head_dim, layer_idx=0, layers=1):
        super().__init__()
        self.config = types.SimpleNamespace(num_attention_heads=q_heads, num_key_value_heads=kv_heads,
                                            num_hidden_layers=layers, _attn_implementation="sdpa")
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Identity()


def eager_attentions(queries, keys):
    """softmax(q·kᵀ/√D + causal mask) in fp32: [B, Hq, T, T]."""
    group = queries.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)
    logits = queries @ k.transpose(2, 3) / (queries.shape[-1] ** 0.5)
    t = queries.shape[2]
    mask = torch.triu(torch.full((t, t), float("-inf"), device=queries.device), diagonal=1)
    return torch.softmax(logits + mask, dim=-1, dtype=torch.float32)


def kvpress_kept(name, args, queries, keys, values, layer):
    batch, q_heads, tokens, head_dim = queries.shape
    kv_heads = keys.shape[1]
    module = MockAttention(q_heads, kv_heads, head_dim, layer, args.layers)
    hidden_states = queries.transpose(1, 2).reshape(batch, tokens, q_heads * head_dim)
    ones = torch.ones(batch, tokens, head_dim, device=queries.device)
    kwargs = {"position_embeddings": (ones, torch.zeros_like(ones))}
    attentions = None
    cr = args.compression_ratio
    if name == "snapkv":
        press = SnapKVPress(compression_ratio=cr, window_size=args.window, kernel_size=args.kernel)
    elif name == "snapkv_attentions":
        press = SnapKVPress(compression_ratio=cr, window_size=args.window, kernel_size=args.kernel)
        attentions = eager_attentions(queries, keys)
    elif name == "streaming_llm":
        press = StreamingLLMPress(compression_ratio=cr, n_sink=args.n_sink)
    elif name == "knorm":
        press = KnormPress(compression_ratio=cr)
    elif name == "observed_attention":
        press = ObservedAttentionPress(compression_ratio=cr)
        attentions = eager_attentions(queries, keys)
    elif name == "adakv_snapkv":
        press = AdaKVPress(SnapKVPress(compression_ratio=cr, window_size=args.window, kernel_size=args.kernel),
                           alpha_safeguard=args.alpha)
    elif name == "adakv_knorm":
        press = AdaKVPress(KnormPress(compression_ratio=cr), alpha_safeguard=args.alpha)
    elif name == "pyramidkv":
        press = PyramidKVPress(compression_ratio=cr, window_size=args.window, kernel_size=args.kernel, beta=args.beta)
    else:
        raise ValueError(name)

    scorer = press.press if isinstance(press, AdaKVPress) else press
    scores = scorer.score(module, hidden_states, keys, values, attentions, kwargs)
    kept = {}
    if isinstance(press, AdaKVPress):
        press.compress(module, hidden_states, keys, values, attentions, kwargs)
        b_idx, h_idx, t_idx = (x.tolist() for x in module.masked_key_indices)
        pruned = set(zip(b_idx, h_idx, t_idx))
        for b in range(batch):
            for h in range(kv_heads):
                kept[(b, h)] = [t for t in range(tokens) if (b, h, t) not in pruned]
    else:
        _, kept_values = press.compress(module, hidden_states, keys, values, attentions, kwargs)
        for b in range(batch):
            for h in range(kv_heads):
                kept[(b, h)] = sorted(int(x) for x in kept_values[b, h, :, 0].tolist())
    return kept, scores


def kvtrim_kept(name, args, queries, keys, values, layer, driver):
    press = "snapkv" if name == "snapkv_attentions" else name
    batch, q_heads, tokens, head_dim = queries.shape
    with tempfile.TemporaryDirectory() as directory:
        for tensor, file in ((keys, "keys.f32"), (values, "values.f32"), (queries, "queries.f32")):
            tensor.detach().to("cpu", torch.float32).contiguous().numpy().tofile(os.path.join(directory, file))
        config = dict(press=press, batch=batch, q_heads=q_heads, kv_heads=keys.shape[1], head_dim=head_dim,
                      tokens=tokens, compression_ratio=repr(args.compression_ratio), window=args.window,
                      kernel=args.kernel, n_sink=args.n_sink, alpha=repr(args.alpha), layer=layer,
                      layers=args.layers, beta=args.beta)
        with open(os.path.join(directory, "config.txt"), "w") as file:
            file.writelines(f"{key} {value}\n" for key, value in config.items())
        output = subprocess.run([driver, directory], check=True, capture_output=True, text=True).stdout
    kept = {}
    for line in output.splitlines():
        fields = [int(x) for x in line.split()]
        kept[(fields[0], fields[1])] = fields[2:]
    return kept


def explained_by_ties(want, got, scores, tolerance):
    """True when every token in one set but not the other scores (kvpress) like the boundary."""
    want_set, got_set = set(want), set(got)
    row = scores.double()
    boundary = min(row[t].item() for t in want) if want else 0.0
    scale = max(1e-30, row[torch.isfinite(row)].abs().max().item())
    return all(abs(row[t].item() - boundary) <= tolerance * scale for t in want_set ^ got_set)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--driver", default="build/cpu-release/tests/kvpress_driver")
    parser.add_argument("--presses", default="snapkv,snapkv_attentions,streaming_llm,knorm,observed_attention,"
                                             "adakv_snapkv,adakv_knorm,pyramidkv")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=600)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--shapes", default="8:2,4:4,8:1", help="q_heads:kv_heads pairs")
    parser.add_argument("--compression-ratios", default="0.25,0.5,0.8")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=5)
    parser.add_argument("--n-sink", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.2)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--pyramid-layers-checked", default="0,7,31")
    parser.add_argument("--beta", type=int, default=20)
    parser.add_argument("--tie-tolerance", type=float, default=1e-5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 matmuls, as kvtrim's reference
    generator = torch.Generator(device="cpu").manual_seed(0)
    heads_total = exact_total = tie_total = 0
    failures = []
    for trial in range(args.trials):
        for shape in args.shapes.split(","):
            q_heads, kv_heads = (int(x) for x in shape.split(":"))
            size = (args.batch, kv_heads, args.tokens, args.head_dim)
            keys = torch.randn(size, generator=generator).to(args.device)
            values = torch.randn(size, generator=generator)
            values[..., 0] = torch.arange(args.tokens, dtype=torch.float32)  # token index, to read kept sets back
            values = values.to(args.device)
            queries = torch.randn((args.batch, q_heads, args.tokens, args.head_dim), generator=generator).to(args.device)
            for cr in (float(x) for x in args.compression_ratios.split(",")):
                args.compression_ratio = cr
                for name in args.presses.split(","):
                    layers = [int(x) for x in args.pyramid_layers_checked.split(",")] if name == "pyramidkv" else [0]
                    for layer in layers:
                        want, scores = kvpress_kept(name, args, queries, keys, values, layer)
                        got = kvtrim_kept(name, args, queries, keys, values, layer, args.driver)
                        for (b, h), want_set in want.items():
                            heads_total += 1
                            got_set = got.get((b, h), [])
                            if got_set == want_set:
                                exact_total += 1
                            elif explained_by_ties(want_set, got_set, scores[b, h].cpu(), args.tie_tolerance):
                                tie_total += 1
                            else:
                                failures.append((trial, shape, cr, name, layer, b, h,
                                                 sorted(set(want_set) - set(got_set))[:10],
                                                 sorted(set(got_set) - set(want_set))[:10]))
    print(f"kept sets compared: {heads_total}; identical: {exact_total}; differing only by ties: {tie_total}; "
          f"mismatched: {len(failures)}")
    for trial, shape, cr, name, layer, b, h, only_kvpress, only_kvtrim in failures[:20]:
        print(f"  MISMATCH trial {trial} shape {shape} cr {cr} {name} layer {layer} (b {b}, h {h}): "
              f"kvpress only {only_kvpress}, kvtrim only {only_kvtrim}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
