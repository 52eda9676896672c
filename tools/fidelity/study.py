"""The fidelity study: every kvtrim policy and codec on the model of tools/model, through kvtrim's Python package.

    python3 tools/fidelity/study.py --model .model --out results.json [--samples 32] [--quick]

For each task (tools/model/data.py: lm, needle, aware) and each configuration:
 1. prefill the prefixes [B, T] with full attention, capturing each layer's
    keys, values (after RoPE) and queries;
 2. per layer, a kvtrim.Cache (CPU backend, flat layout: ragged per-head
    budgets) compresses the prefill keys/values (SnapKV and H2O read the
    queries), the way kvpress compresses a prompt;
 3. the kept keys/values are read back (Cache.read: dequantized by the codec,
    Cache.positions: which tokens) with their logit bias (padding; RazorAttention's
    compensation token weighs N_d copies) and the continuation runs over them —
    each continuation byte attends over the layer's compressed prefix plus the
    continuation so far, uncompressed (generated tokens are not compressed, as in kvpress);
 4. scores: next-byte accuracy and bits per byte on the continuation, needle success
    (all 8 value bytes right: what greedy decoding would write), bytes held per token
    (kvtrim's stats: every layer's kept tokens × its codec's bytes per token).
A check on every configuration: kvtrim's own decode attention (Cache.attend) of the last
prefix query equals the read-back computation (max |difference| is recorded), so the
scores are those of kvtrim's attention, not of a re-implementation.

Where the package was built with CUDA and a scheme is compiled for it, the same
compression runs on the GPU (contiguous layout) and its kept sets and attention
are compared with the CPU's.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "model"))
from data import load_corpus, make_tasks  # noqa: E402
from model import Config, Decoder, Prefix  # noqa: E402

import kvtrim  # noqa: E402

FRACTIONS = (0.1, 0.2, 0.3, 0.5, 0.7)
SNAP_WINDOW, SNAP_KERNEL = 32, 5


@dataclass
class Setup:
    """One configuration: a name, a family (the plots' series), the kept fraction asked for, a press and a codec."""
    name: str
    family: str
    fraction: float
    press: Callable[[int], kvtrim.Press]  # layer count → press (RazorAttention needs the profile)
    codec: Callable[[], kvtrim.Codec]
    note: str = ""
    device: str = "cpu"       # the backend that compresses: "cuda" rows are the GPU twins of "cpu" rows
    pre_rope: bool = False    # the codec takes the keys before RoPE (low-rank pre-RoPE)

    def on(self, device: str) -> "Setup":
        return Setup(self.name, self.family, self.fraction, self.press, self.codec, self.note, device, self.pre_rope)


def scheme_exists(device, layout, scorer, budget, codec) -> bool:
    return (device, layout, scorer, budget, codec) in SCHEMES


SCHEMES = set()


def setups(flags, razor_recent: Dict[float, float], quick: bool, rope_theta: float) -> List[Setup]:
    fp16, int8 = kvtrim.FP16, (lambda: kvtrim.KIVI(bits=8, group=32))
    int4 = lambda: kvtrim.KIVI(bits=4, group=32)  # noqa: E731
    everything = lambda L: kvtrim.StreamingLLM(compression_ratio=0.0)  # noqa: E731 - the codec alone
    out: List[Setup] = [
        Setup("kvtrim fp16, all tokens", "codec", 1.0, everything, fp16),
        Setup("kvtrim bf16, all tokens", "codec", 1.0, everything, kvtrim.BF16),
        Setup("kvtrim int8 KIVI g32, all tokens", "codec", 1.0, everything, int8),
        Setup("kvtrim int4 KIVI g32, all tokens", "codec", 1.0, everything, int4),
        Setup("kvtrim fp8 e4m3, all tokens", "codec", 1.0, everything, kvtrim.FP8),
        Setup("kvtrim layered int4 (fp16 sinks 4 + recent 128), all tokens", "codec", 1.0, everything,
              lambda: kvtrim.Layered(int4(), sinks=4, recent=128)),
    ]
    for rank in (8, 16, 32):  # of head_dim 64; max_rank = rank, so storage holds exactly `rank` coefficients
        out.append(Setup(f"kvtrim low-rank post-RoPE r{rank}, all tokens", "low-rank post-RoPE", 1.0, everything,
                         lambda r=rank: kvtrim.LowRank(rank=r, max_rank=r), f"rank {rank} of 64, keys and values"))
        out.append(Setup(f"kvtrim low-rank pre-RoPE r{rank}, all tokens", "low-rank pre-RoPE", 1.0, everything,
                         lambda r=rank: kvtrim.LowRank(rank=r, max_rank=r, pre_rope=True, rope_theta=rope_theta),
                         f"rank {rank} of 64, keys before RoPE (rotated inside attention), values", pre_rope=True))
    fractions = (0.2, 0.5) if quick else FRACTIONS
    # Order = what a --deadline drops last: the policies the findings compare (StreamingLLM, SnapKV, Ada-SnapKV,
    # RazorAttention, the combinations) at every fraction, then Pyramid and key norm, then H2O.
    later = []
    for f in fractions:
        r = round(1.0 - f, 6)
        snap = lambda r=r: kvtrim.SnapKV(window=SNAP_WINDOW, kernel=SNAP_KERNEL, compression_ratio=r)
        out += [
            Setup("StreamingLLM", "StreamingLLM", f, lambda L, r=r: kvtrim.StreamingLLM(sinks=4, compression_ratio=r), fp16),
            Setup("SnapKV", "SnapKV", f, lambda L, s=snap: s(), fp16),
            Setup("Ada-SnapKV", "Ada-SnapKV", f, lambda L, s=snap: kvtrim.AdaKV(s(), alpha=0.2), fp16),
            Setup("Ada-SnapKV + int8", "Ada-SnapKV + int8", f, lambda L, s=snap: kvtrim.AdaKV(s(), alpha=0.2), int8),
        ]
        later += [
            Setup("Pyramid-SnapKV", "Pyramid-SnapKV", f, lambda L, s=snap: kvtrim.Pyramid(s(), beta=20), fp16),
            Setup("key norm", "key norm", f, lambda L, r=r: kvtrim.KeyNorm(compression_ratio=r), fp16),
        ]
    for f, rho in sorted(razor_recent.items()):
        if quick and f not in (0.2, 0.5):
            continue
        press = lambda L, rho=rho: kvtrim.RazorAttention(flags, sinks=4, min_recent=16, recent_fraction=rho)
        out.append(Setup("RazorAttention", "RazorAttention", f, press, fp16, f"recent fraction {rho:.3f}"))
        out.append(Setup("RazorAttention + int4", "RazorAttention + int4", f, press, int4, f"recent fraction {rho:.3f}"))
    out += later
    # H2O last: it scores every prefill query against every key (T² per head, minutes of CPU at 2048 tokens), so
    # under a deadline its least useful points are the ones dropped (main: --deadline)
    for f in (0.2, 0.5, 0.1, 0.3, 0.7):
        if f in fractions:
            r = round(1.0 - f, 6)
            out.append(Setup("H2O", "H2O", f, lambda L, r=r, f=f: kvtrim.H2O(recent=f / 2, compression_ratio=r), fp16,
                             "half heavy hitters, half recent (the paper's split)"))
    return out


TWIN_FRACTIONS = (0.5, 1.0)  # --cpu-twins sampled: where both backends still run (1.0: the codec rows)


def with_gpu_twins(plan: List[Setup], layers: int, cpu_twins: str = "all") -> List[Setup]:
    """Each setup followed by its CUDA twin where kvtrim compiled the scheme for CUDA on the flat layout.
    cpu_twins="sampled": where CUDA has the scheme, only its CUDA row runs, except at TWIN_FRACTIONS, where the
    CPU row runs too and the two are compared (a study that fits one device call; an earlier run compared every
    setup: 50 of 51 task runs had identical kept sets, the other one token of 206,424 from a near-tie)."""
    if not (kvtrim.has_cuda and torch.cuda.is_available()):
        return plan
    out = []
    for s in plan:
        on_cuda = cuda_scheme(s, layers) is not None
        if not on_cuda or cpu_twins == "all" or s.fraction in TWIN_FRACTIONS:
            out.append(s)
        if on_cuda:
            out.append(s.on("cuda"))
    return out


def cuda_scheme(s: Setup, layers: int):
    settings = kvtrim.Settings()
    s.press(layers)._fill(settings, 0, layers)
    s.codec()._fill(settings)
    key = ("cuda", "flat", settings.scorer, settings.budget, settings.codec)
    return key if key in SCHEMES else None


# The element type each codec reads on CUDA (the CPU widens it to float32 exactly): every backend gets these
# same rounded inputs, as an fp16 engine would hand its fp16 keys to kvtrim.
INPUT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "layered<int8>": torch.float16,
                "layered<int4>": torch.float16}


def missing_schemes() -> List[str]:
    """What the study asks for that the package's registry does not compile (reported, not run)."""
    codecs = {key[4] for key in SCHEMES}
    wanted = {"int4": "int4 (KIVI 4-bit)", "fp8": "fp8 (e4m3)", "low_rank": "low-rank (post- and pre-RoPE)",
              "layered<int4>": "layered (fp16 sinks + recent over int4)"}
    return [f"codec {label}: not in kvtrim.schemes() (codecs compiled: {', '.join(sorted(codecs))})"
            for key, label in wanted.items() if key not in codecs]


# ---- the model side -----------------------------------------------------------------------


def load_model(directory, device):
    with open(os.path.join(directory, "config.json")) as f:
        config = Config(**json.load(f))
    model = Decoder(config)
    model.load_state_dict(torch.load(os.path.join(directory, "model.pt"), map_location="cpu"))
    return model.to(device).eval(), config


def calibrate_razor(model, config, device):
    """RazorAttention's retrieval heads of this model, found by kvtrim's probe and calibration."""
    # Bytes: random printable ids (33..126) repeated; a newline stands for BOS.
    probe = kvtrim.Probe(block=90, repeats=4, first_id=33, end_id=127, bos_id=10, seed=0)
    tokens = torch.from_numpy(probe.tokens().astype(np.int64))[None].to(device)
    calibration = kvtrim.Calibration(config.layers, config.q_heads, config.kv_heads, config.head_dim, probe)
    with torch.no_grad():
        _, captured = model(tokens, capture=True)
    L = tokens.shape[1]
    group = config.q_heads // config.kv_heads
    causal = torch.full((L, L), float("-inf"), device=device).triu(1)
    for layer, (q, k, _, _) in enumerate(captured):
        k = k.repeat_interleave(group, dim=1)
        attention = torch.softmax(q[0].float() @ k[0].float().transpose(-1, -2) / math.sqrt(config.head_dim) + causal, -1)
        calibration.accumulate(layer, np.ascontiguousarray(attention.cpu().numpy(), dtype=np.float32), 0)
    scores = calibration.scores()
    if kvtrim.has_profiles:
        profile = calibration.profile(induction_fraction=0.14, echo_fraction=0.01)
        flags = [list(profile.retrieval(layer)) for layer in range(config.layers)]
    else:  # the same selection rule (retrieval_head.hpp): top ⌈14%⌉ by induction ∪ top ⌈1%⌉ by echo
        n = config.layers * config.kv_heads
        pick = set(np.argsort(-np.array(scores["induction"]), kind="stable")[:math.ceil(0.14 * n)].tolist())
        pick |= set(np.argsort(-np.array(scores["echo"]), kind="stable")[:math.ceil(0.01 * n)].tolist())
        flags = [[layer * config.kv_heads + h in pick for h in range(config.kv_heads)] for layer in range(config.layers)]
    return flags, {"probe": {"block": probe.block, "repeats": probe.repeats, "ids": [33, 127], "length": probe.length},
                   "induction": [round(float(x), 4) for x in scores["induction"]],
                   "echo": [round(float(x), 4) for x in scores["echo"]], "retrieval_heads": flags}


def razor_recent_fractions(flags, config, T, sinks=4, min_recent=16):
    """The recent fraction ρ that makes RazorAttention keep each kept fraction of the cache (or the least it can)."""
    heads = config.layers * config.kv_heads
    retrieval = sum(sum(layer) for layer in flags)
    floor_fraction = (retrieval * T + (heads - retrieval) * (sinks + min_recent + 1)) / (heads * T)
    out = {}
    for f in FRACTIONS:
        if f <= floor_fraction + 1e-9:
            out[round(floor_fraction, 3)] = 0.0
            continue
        per_head = (f * heads * T - retrieval * T) / (heads - retrieval)  # tokens a non-retrieval head keeps
        out[f] = max(0.0, (per_head - sinks - 1) / T)
    return out


# ---- kvtrim side: compress one layer, read back -------------------------------------------


def compress_layer(setup: Setup, layer: int, layers: int, shape, k, v, q_window, q_all, q_last, k_pre, T):
    """Runs kvtrim on one layer of a batch (setup.device's backend); returns what the continuation needs, as NumPy."""
    press, codec = setup.press(layers), setup.codec()
    B, Hkv = k.shape[0], k.shape[1]
    heads = B * Hkv
    # KIVI stores each head's tokens in whole runs of its key group (32 slots): up to 31 more per head
    capacity = (press.total_keep(T, heads) + heads * 32 + 31) // 32 * 32
    cache = kvtrim.Cache(press, codec, "flat", shape, B, capacity, layer=layer, layers=layers, device=setup.device)
    dtype = INPUT_DTYPES.get(codec.name, torch.float32)
    if setup.device == "cuda":
        arrive = lambda a: torch.from_numpy(a).to("cuda", dtype)  # noqa: E731
    else:  # the same rounded values, widened back to float32 (exact) for the CPU backend
        arrive = lambda a: a if dtype == torch.float32 else torch.from_numpy(a).to(dtype).float().numpy()  # noqa: E731
    window = press.window_queries
    queries = None if window == 0 else (q_all if window < 0 else q_window[:, :, -window:])
    started = time.perf_counter()
    cache.compress(arrive(k_pre if setup.pre_rope else k), arrive(v),
                   None if queries is None else arrive(np.ascontiguousarray(queries)))
    if setup.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    kept_offsets, kept_tokens = (np.asarray(a).copy() for a in cache.kept())
    lengths = cache.head_lengths().astype(np.int64)
    positions = cache.positions()
    P = int(lengths.max())
    D = k.shape[-1]
    keys = np.zeros((B, Hkv, P, D), np.float32)
    values = np.zeros((B, Hkv, P, D), np.float32)
    bias = np.full((B, Hkv, P), -np.inf, np.float32)
    pos = np.full((B, Hkv, P), -1, np.int64)
    offset = 0
    compensated = 0
    for b in range(B):
        for h in range(Hkv):
            n = int(lengths[b * Hkv + h])
            kk, vv = cache.read(b, h)
            keys[b, h, :n], values[b, h, :n] = kk, vv
            bias[b, h, :n] = 0.0
            pos[b, h, :n] = positions[offset:offset + n]
            offset += n
            if isinstance(press, kvtrim.RazorAttention) and not press.flags(layer)[h] and n < T:
                # RazorAttention's compensation token: the mean of the N_d dropped tokens, kept at index `sinks`,
                # weighs N_d copies (logit + ln N_d; retrieval_head.hpp). Read-back gives its key and value only;
                # the attend check below confirms the bias.
                recent = max(press.min_recent, math.floor(press.recent_fraction * T))
                bias[b, h, press.sinks] = math.log(T - press.sinks - recent)
                compensated += 1
    stats = cache.stats()
    out = cache.attend(arrive(np.ascontiguousarray(q_last)))
    if setup.device == "cuda":
        out = out.float().cpu().numpy()
    return {"keys": keys, "values": values, "bias": bias, "positions": pos, "lengths": lengths,
            "held_bytes": int(stats["total_bytes"]), "kept": int(np.sum(lengths)), "attend": np.asarray(out),
            "compress_seconds": seconds, "compensated": compensated, "scheme": cache.name,
            "kept_sets": [kept_tokens[a:b] for a, b in zip(kept_offsets[:-1], kept_offsets[1:])]}


def merge(parts):
    """Joins compress_layer's results for consecutive batch slices (read-backs padded to the longest head)."""
    if len(parts) == 1:
        return parts[0]
    P = max(p["keys"].shape[2] for p in parts)
    pad = lambda a, value: np.pad(a, [(0, 0), (0, 0), (0, P - a.shape[2])] + [(0, 0)] * (a.ndim - 3),  # noqa: E731
                                  constant_values=value)
    out = {"keys": np.concatenate([pad(p["keys"], 0.0) for p in parts]),
           "values": np.concatenate([pad(p["values"], 0.0) for p in parts]),
           "bias": np.concatenate([pad(p["bias"], -np.inf) for p in parts]),
           "positions": np.concatenate([pad(p["positions"], -1) for p in parts]),
           "lengths": np.concatenate([p["lengths"] for p in parts]),
           "attend": np.concatenate([np.asarray(p["attend"]) for p in parts])}
    for key in ("held_bytes", "kept", "compress_seconds", "compensated"):
        out[key] = sum(p[key] for p in parts)
    out["kept_sets"] = [head for p in parts for head in p["kept_sets"]]
    out["scheme"] = parts[0]["scheme"]
    return out


def torch_decode(q_last, keys, values, bias):
    """The read-back computation kvtrim's attend must equal: q [B, Hq, D] over slots [B, Hkv, P, D]."""
    B, Hq, D = q_last.shape
    Hkv = keys.shape[1]
    qg = q_last.view(B, Hkv, Hq // Hkv, D)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, keys) / math.sqrt(D) + bias[:, :, None]
    return torch.einsum("bhgn,bhnd->bhgd", torch.softmax(logits, -1), values).reshape(B, Hq, D)


def score(task, logits, ids):
    """logits [B, C, V] of the continuation positions T.. ; ids [B, L]."""
    T = task.prefix_len
    log_probs = torch.log_softmax(logits.float(), -1)
    bits, correct, success = [], [], []
    for i, (first, last) in enumerate(task.scored):
        rows = torch.arange(first - 1, last - 1, device=logits.device) - T  # position i-1 predicts byte i
        target = ids[i, first:last]
        lp = log_probs[i, rows].gather(-1, target[:, None])[:, 0]
        hit = log_probs[i, rows].argmax(-1) == target
        bits.append(float(-lp.sum()) / math.log(2))
        correct.append(hit.float().sum().item())
        success.append(bool(hit.all()))
    n = sum(last - first for first, last in task.scored)
    return {"bits_per_byte": sum(bits) / n, "accuracy": sum(correct) / n, "success": sum(success) / len(success)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=".model")
    parser.add_argument("--out", default="fidelity.json")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="two kept fractions only")
    parser.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds the whole study may take (0: no limit); each task gets its share, and H2O "
                             "points that would not fit are dropped (recorded as skipped)")
    parser.add_argument("--cpu-twins", choices=("all", "sampled"), default="all",
                        help="all: every setup on the CPU, and on CUDA too where compiled; sampled: CUDA alone where "
                             "compiled, both backends at kept fractions 50%% and 100%% (compared)")
    parser.add_argument("--tasks", default="lm,needle,aware",
                        help="comma-separated tasks to run (lm, needle, aware): a study split over device calls")
    parser.add_argument("--merge", default="",
                        help="an earlier fidelity.json of the SAME model (same training record): its rows of the "
                             "tasks not run now are kept, so calls that each run some tasks give one table")
    parser.add_argument("--no-eviction", dest="eviction", action="store_false",
                        help="skip the decode-time eviction rows (lm and needle tasks, 20%% and 50%%)")
    parser.add_argument("--eviction-backend", choices=("auto", "cuda", "cpu"), default="auto",
                        help="backend of the decode-time eviction rows' caches and kvtrim.Eviction: auto is cuda "
                             "where kvtrim has CUDA and a GPU is present (the CPU loop was ~8x slower than the rest)")
    args = parser.parse_args()
    started = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    SCHEMES.update(tuple(s) for s in kvtrim.schemes())

    model, config = load_model(args.model, device)
    corpus = load_corpus(max_train_bytes=0)
    tasks = make_tasks(corpus.held_out, args.prefix, args.continuation, args.samples)
    wanted = [name for name in args.tasks.split(",") if name]
    unknown = sorted(set(wanted) - {t.name for t in tasks})
    if unknown:
        parser.error(f"--tasks: unknown {unknown}; the tasks are {[t.name for t in tasks]}")
    tasks = [t for t in tasks if t.name in wanted]
    flags, razor = calibrate_razor(model, config, device)
    print(f"retrieval heads (layer: kv heads): {flags}", flush=True)
    T = args.prefix
    razor_recent = razor_recent_fractions(flags, config, T)
    plan = with_gpu_twins(setups(flags, razor_recent, args.quick, config.rope_base), config.layers, args.cpu_twins)
    shape = (config.q_heads, config.kv_heads, config.head_dim)
    fp16_bytes_per_token = config.layers * config.kv_heads * 2 * config.head_dim * 2
    results, cuda_checks, tasks_done = earlier_rows(args, {t.name for t in tasks})
    pool = cf.ThreadPoolExecutor(args.threads)  # compress releases the GIL: layers and setups run side by side
    # cuda_checks: one per GPU twin row (kept sets and metrics against the CPU row), earlier calls' included
    for task in tasks:
        ids = torch.tensor(np.array([np.frombuffer(e, dtype=np.uint8) for e in task.examples]), dtype=torch.long,
                           device=device)
        with torch.no_grad():
            _, captured = model(ids[:, :T], capture=True)
            reference = model(ids)[:, T:]  # full attention over prefix + continuation: the uncompressed model
        caps = []
        for q, k, v, k_pre in captured:
            caps.append((np.ascontiguousarray(k.float().cpu().numpy()), np.ascontiguousarray(v.float().cpu().numpy()),
                         np.ascontiguousarray(q.float().cpu().numpy()[:, :, -SNAP_WINDOW:]),
                         np.ascontiguousarray(q.float().cpu().numpy()), np.ascontiguousarray(q[:, :, -1].float().cpu().numpy()),
                         np.ascontiguousarray(k_pre.float().cpu().numpy())))
        full = score(task, reference, ids)
        with torch.no_grad():  # the continuation path over the exact prefill keys/values must be the full model
            exact = [Prefix(k, v, torch.zeros(k.shape[:3], device=device)) for _, k, v, _ in captured]
            path_difference = float((model(ids[:, T:], start=T, prefix=exact) - reference).abs().max())
        print(f"continuation path over the uncompressed prefix vs the full forward: max |logit difference| "
              f"{path_difference:.1e}", flush=True)
        del exact
        results.append({"task": task.name, "setup": "full cache (no kvtrim)", "family": "full", "fraction": 1.0,
                        "bytes_per_token": fp16_bytes_per_token, "kept_fraction": 1.0,
                        "continuation_path_max_logit_difference": path_difference, **full})
        print(f"[{time.time() - started:6.1f} s] {task.name}: full cache {full}", flush=True)
        # compressions run on the pool a few setups ahead of the GPU (read-backs are large: bound what waits)
        def submit(s):
            # H2O scores every prefill query (T² work per head): its batch is split so that all cores share it
            # (its budget is per head, so a split changes nothing; Ada-KV's shared budget is never split).
            chunks = (min(args.threads // 4, ids.shape[0])
                      if s.press(config.layers).window_queries < 0 and s.device == "cpu" else 1)
            edges = np.linspace(0, ids.shape[0], max(1, chunks) + 1).astype(int)
            return [[pool.submit(compress_layer, s, layer, config.layers, shape, *(a[b0:b1] for a in caps[layer]), T)
                     for b0, b1 in zip(edges[:-1], edges[1:])] for layer in range(config.layers)]
        ahead = max(2, args.threads // config.layers + 1)
        futures = [submit(s) for s in plan[:ahead]]
        task_started, slowest_h2o, previous_done = time.time(), 0.0, time.time()
        cpu_kept = {}  # (setup, fraction) → kept sets per layer, until its GPU twin compares with them
        tasks_left = len(tasks) - tasks.index(task)
        task_budget = (args.deadline - (time.time() - started)) / tasks_left if args.deadline else float("inf")
        for i, s in enumerate(plan):
            expected = slowest_h2o if s.family == "H2O" else 0.0
            if time.time() - task_started + expected > task_budget:
                for j in range(i, len(plan)):  # out of this task's share of the deadline: the rest of H2O is dropped
                    for chunks in futures[j] if j < len(futures) and futures[j] else []:
                        for f in chunks:
                            f.cancel()
                    results.append({"task": task.name, "setup": plan[j].name, "family": plan[j].family,
                                    "fraction": plan[j].fraction, "backend": plan[j].device,
                                    "skipped": f"time: this task's share of --deadline {args.deadline:.0f} s"})
                print(f"{task.name}: {len(plan) - i} setups skipped (deadline): "
                      f"{', '.join(f'{p.name} {p.fraction:.0%} {p.device}' for p in plan[i:])}", flush=True)
                break
            if i + ahead < len(plan):
                futures.append(submit(plan[i + ahead]))
            try:
                layers = [merge([f.result() for f in chunks]) for chunks in futures[i]]
            except Exception as failure:  # noqa: BLE001 - recorded in the results, the study goes on
                results.append({"task": task.name, "setup": s.name, "family": s.family, "fraction": s.fraction,
                                "backend": s.device, "error": repr(failure)})
                print(f"{task.name} {s.name} {s.fraction}: {failure!r}", flush=True)
                continue
            finally:
                futures[i] = None
            prefixes, worst = [], 0.0
            rounded = INPUT_DTYPES.get(s.codec().name, torch.float32)  # the queries kvtrim's attend was given
            for layer, got in enumerate(layers):
                keys = torch.from_numpy(got["keys"]).to(device)
                values = torch.from_numpy(got["values"]).to(device)
                bias = torch.from_numpy(got["bias"]).to(device)
                q_last = torch.from_numpy(caps[layer][4]).to(device).to(rounded).float()
                mine = torch_decode(q_last, keys, values, bias)
                theirs = torch.from_numpy(np.asarray(got["attend"])).to(device).view_as(mine)
                worst = max(worst, float((mine - theirs).abs().max()))
                prefixes.append(Prefix(keys, values, bias))
            with torch.no_grad():
                logits = model(ids[:, T:], start=T, prefix=prefixes)
            metrics = score(task, logits, ids)
            if s.family == "H2O":
                slowest_h2o = max(slowest_h2o, time.time() - previous_done)
            previous_done = time.time()
            held = sum(g["held_bytes"] for g in layers)
            kept = sum(g["kept"] for g in layers)
            row = {"task": task.name, "setup": s.name, "family": s.family, "fraction": s.fraction, "note": s.note,
                   "backend": s.device, "scheme": layers[0]["scheme"], "bytes_per_token": held / (ids.shape[0] * T),
                   "kept_fraction": kept / (ids.shape[0] * config.kv_heads * T * config.layers),
                   "attend_max_abs_difference": worst,
                   "compress_seconds": sum(g["compress_seconds"] for g in layers),
                   "compensated_heads": sum(g["compensated"] for g in layers), **metrics}
            results.append(row)
            key = (s.name, s.fraction)
            if s.device == "cpu":
                cpu_kept[key] = ([g["kept_sets"] for g in layers], row)
            elif key in cpu_kept:
                cuda_checks.append(compare_backends(task.name, s, *cpu_kept.pop(key), [g["kept_sets"] for g in layers], row))
            del layers, prefixes
            if len(results) % 16 == 0:  # a run killed mid-task keeps most of what it measured
                write(args, config, T, fp16_bytes_per_token, razor, razor_recent, cuda_checks, corpus, started, device,
                      results, complete=False, tasks_done=tasks_done)
            print(f"[{time.time() - started:6.1f} s] {task.name:6s} {s.device:4s} {s.name[:40]:40s} {s.fraction:4.2f} kept "
                  f"{row['kept_fraction']:.3f} {row['bytes_per_token']:7.1f} B/token  acc {metrics['accuracy']:.3f} "
                  f"bpb {metrics['bits_per_byte']:.3f} needle {metrics['success']:.2f}  |attend diff| {worst:.1e}",
                  flush=True)
        if args.eviction and task.name in ("lm", "needle"):
            eviction_deadline = started + args.deadline - 20 if args.deadline else float("inf")
            results += decode_rows(task, model, config, ids, caps, T, device, (0.2, 0.5), eviction_deadline,
                                   eviction_backend(args.eviction_backend))
        tasks_done.append(task.name)
        write(args, config, T, fp16_bytes_per_token, razor, razor_recent, cuda_checks, corpus, started, device, results,
              complete=set(tasks_done) >= {"lm", "needle", "aware"}, tasks_done=tasks_done)
    pool.shutdown()


def earlier_rows(args, running):
    """The rows, backend checks and finished tasks of an earlier call (--merge) for the tasks not run now. Refused
    unless that call studied the same trained model with the same study parameters (rows of two trainings or two
    settings must never share a table); only tasks that call finished are kept (a call stopped mid-task keeps its
    partial rows in its own file, not in the merged table)."""
    if not args.merge:
        return [], [], []
    with open(args.merge) as f:
        earlier = json.load(f)
    with open(os.path.join(args.model, "train.json")) as f:
        training = json.load(f)
    if earlier.get("training") != training:
        raise SystemExit(f"--merge {args.merge}: it was not made with the model in {args.model} (training records differ)")
    mine = {"prefix_bytes": args.prefix, "continuation_bytes": args.continuation, "samples": args.samples,
            "cpu_twins": args.cpu_twins}
    differing = {key: (earlier.get(key), value) for key, value in mine.items() if earlier.get(key) != value}
    if differing:
        raise SystemExit(f"--merge {args.merge}: its study parameters differ (earlier, now): {differing}")
    done = [name for name in earlier.get("tasks_done", []) if name not in running]
    rows = [r for r in earlier["results"] if r["task"] in done]
    checks = [c for c in earlier.get("cuda_checks", []) if c.get("task") in done]
    print(f"--merge: tasks {done} ({len(rows)} rows, {len(checks)} backend checks) kept from {args.merge}", flush=True)
    return rows, checks, done


def write(args, config, T, fp16_bytes_per_token, razor, razor_recent, cuda_checks, corpus, started, device, results,
          complete, tasks_done):
    """Writes the results so far (after every task: a run stopped by its deadline keeps what it finished)."""
    out = {"complete": complete, "tasks_done": list(tasks_done), "cpu_twins": args.cpu_twins, "model": config.to_dict(), "prefix_bytes": T, "continuation_bytes": args.continuation,
           "samples": args.samples, "fp16_bytes_per_token": fp16_bytes_per_token, "snapkv": {"window": SNAP_WINDOW, "kernel": SNAP_KERNEL},
           "razor": razor, "razor_recent_fraction": {str(k): v for k, v in razor_recent.items()},
           "missing": missing_schemes(), "cuda_checks": cuda_checks, "kvtrim_has_cuda": kvtrim.has_cuda,
           "schemes_compiled": len(SCHEMES), "corpus": corpus.describe(), "seconds": round(time.time() - started, 1),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "results": results}
    train_log = os.path.join(args.model, "train.json")
    if os.path.exists(train_log):
        with open(train_log) as f:
            out["training"] = json.load(f)
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}: {len(results)} rows, {time.time() - started:.0f} s", flush=True)


EVICTION_INTERVAL = 16


def eviction_backend(choice: str) -> str:
    """The decode-eviction rows' backend: cuda where kvtrim has CUDA and a GPU is present, unless told."""
    available = kvtrim.has_cuda and torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise SystemExit("--eviction-backend cuda: kvtrim was built without CUDA or no GPU is present")
    return ("cuda" if available else "cpu") if choice == "auto" else choice


def decode_rows(task, model, config, ids, caps, T, device, fractions, deadline_at, backend="cpu"):
    """Decode-time eviction (issue 16) next to prefill-only compression, both through kvtrim's own decode attention.

    Each layer gets a paged fp16 kvtrim.Cache; SnapKV compresses the prompt; then the continuation runs one byte at
    a time: each layer appends the byte's key/value to its cache and attends through kvtrim (`backend`: the CPU
    reference, or CUDA with float16 tensors that stay on the GPU). "prefill only"
    compresses to `keep` tokens per kv head and lets the cache grow by the continuation; "eviction" compresses to
    keep − 16, seeds the metric from the observation window, accumulates it in every decode attention and runs
    kvtrim::evict (cross-layer scope, vllm-kvcompress's) every 16 steps, so no sequence ever holds more than keep
    tokens per kv head on average. Rows report the tokens held per kv head (mean over the continuation and at
    its end) next to accuracy and bits per byte."""
    rows = []
    B, L, Hkv = ids.shape[0], config.layers, config.kv_heads
    C = ids.shape[1] - T
    shape = (config.q_heads, Hkv, config.head_dim)
    if backend == "cuda":  # fp16 tensors on the GPU, the CUDA fp16 caches' input type
        half = lambda a: torch.as_tensor(a).to("cuda", torch.float16).contiguous()  # noqa: E731
    else:
        half = lambda a: torch.from_numpy(a).half().float().numpy()  # noqa: E731 - the fp16 values an engine holds
    for f in fractions:
        keep = max(EVICTION_INTERVAL + 1, int(round(f * T)))
        for evict in (False, True):
            if time.time() > deadline_at:
                rows.append({"task": task.name, "setup": "decode loop", "fraction": f, "skipped": "time (deadline)"})
                continue
            started = time.time()
            target = keep - EVICTION_INTERVAL if evict else keep
            caches = [kvtrim.Cache(kvtrim.SnapKV(window=SNAP_WINDOW, kernel=SNAP_KERNEL, tokens=target), kvtrim.FP16(),
                                   "paged", shape, B, B * Hkv * (keep + C + 32), layer=l, layers=L, device=backend,
                                   check="deferred") for l in range(L)]
            eviction = kvtrim.Eviction(caches, keep=keep, interval=EVICTION_INTERVAL, scope="cross_layer") if evict else None
            for l, cache in enumerate(caches):
                k, v, q_window = half(caps[l][0]), half(caps[l][1]), half(caps[l][2])
                cache.compress(k, v, q_window)
                if evict:
                    eviction.seed(l, k, q_window)

            def through(l):
                def attend(q, k, v):  # one byte: [B, H, 1, D] on the model's device
                    if backend == "cuda":
                        caches[l].append(half(k[:, :, :1]), half(v[:, :, :1]))
                        query = half(q[:, :, 0])
                    else:
                        caches[l].append(half(k[:, :, :1].float().cpu().numpy()), half(v[:, :, :1].float().cpu().numpy()))
                        query = half(np.ascontiguousarray(q[:, :, 0].float().cpu().numpy()))
                    out = eviction.attend(l, query) if evict else caches[l].attend(query)
                    out = out if backend == "cuda" else torch.from_numpy(np.asarray(out))
                    return out.to(q.device, q.dtype)[:, :, None]
                return attend

            layers = [through(l) for l in range(L)]
            logits, held, evicted = [], [], 0
            with torch.no_grad():
                for t in range(C):
                    logits.append(model(ids[:, T + t:T + t + 1], start=T + t, prefix=layers))
                    if evict and eviction.due(t + 1):
                        evicted += eviction.step()["evicted_tokens"]
                    held.append(sum(int(c.head_lengths().sum()) for c in caches) / (B * Hkv * L))
            metrics = score(task, torch.cat(logits, dim=1), ids)
            name = (f"SnapKV + eviction every {EVICTION_INTERVAL} (cross-layer)" if evict
                    else "SnapKV prefill only (decode loop)")
            rows.append({"task": task.name, "setup": name, "family": "decode eviction" if evict else "decode prefill-only",
                         "fraction": f, "backend": backend, "keep_per_head": keep,
                         "held_per_head_mean": float(np.mean(held)), "held_per_head_end": held[-1],
                         "kept_fraction": float(np.mean(held)) / (T + C / 2),
                         "bytes_per_token": float(np.mean(held)) * L * Hkv * 2 * config.head_dim * 2 / (T + C / 2),
                         "evicted_tokens": evicted, "seconds": round(time.time() - started, 1), **metrics})
            print(f"[decode loop] {task.name} {name} {f:.2f}: keep {keep}/head, held mean {np.mean(held):.1f} end "
                  f"{held[-1]:.1f}, acc {metrics['accuracy']:.3f} bpb {metrics['bits_per_byte']:.3f} needle "
                  f"{metrics['success']:.2f} ({time.time() - started:.1f} s)", flush=True)
    return rows


def compare_backends(task, s: Setup, cpu_sets, cpu_row, gpu_sets, gpu_row):
    """The GPU twin against the CPU row: kept sets per layer and head, and the table's metrics."""
    tokens = agree = 0
    identical = True
    for cpu_layer, gpu_layer in zip(cpu_sets, gpu_sets):
        for a, b in zip(cpu_layer, gpu_layer):
            a, b = set(a.tolist()), set(b.tolist())
            tokens += len(a)
            agree += len(a & b)
            identical &= a == b
    check = {"task": task, "setup": s.name, "fraction": s.fraction, "kept_sets_identical": bool(identical),
             "kept_tokens_agreeing": agree / max(tokens, 1)}
    for metric in ("accuracy", "bits_per_byte", "success", "bytes_per_token", "kept_fraction"):
        check[f"{metric}_cpu"], check[f"{metric}_cuda"] = cpu_row[metric], gpu_row[metric]
    check["attend_max_abs_difference_cuda"] = gpu_row["attend_max_abs_difference"]
    print(f"CUDA vs CPU {task} {s.name} {s.fraction}: kept sets identical {identical} ({check['kept_tokens_agreeing']:.4f}), "
          f"acc {cpu_row['accuracy']:.4f}/{gpu_row['accuracy']:.4f} bpb {cpu_row['bits_per_byte']:.4f}/"
          f"{gpu_row['bits_per_byte']:.4f}", flush=True)
    return check


if __name__ == "__main__":
    main()
