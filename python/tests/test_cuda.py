"""Every CUDA scheme of the compiled list against the same scheme on the CPU (skipped without torch, a GPU or a CUDA build).

One layer, the same 16-bit inputs to both (the CPU cache widens them to float32
exactly and stores the same fp16/bf16 rows): compress, then two appends, then
decode attention; each cache is inspected through the same calls (head_lengths,
kept, positions, read, stats — a CUDA cache is copied back to the host for them).

What must hold (the C++ suites' rules, tests/cuda/scorers_test.cu and
combinations_test.cu):
  - Scores that are the same bits on both backends — static windows and
    RazorAttention (integers), external scores (a copy) — give the same kept
    CSR, token for token.
  - Key norm: both backends sum squares in double and round once to float, so
    scores are equal or 1 ulp apart; the kept sets are identical unless a kept
    and a dropped token have norms within 2 ulps of each other (a 1-ulp error
    on each side can then swap them) — in the same head (uniform, pyramid) or in
    the same sequence (Ada-KV shares one budget between heads), found from the
    norms in float64 rounded once to float32.
  - SnapKV / H2O (fp32 logits summed in another order on the device): every head
    keeps the same number of tokens where the budget's counts do not depend on
    near-ties (uniform, pyramid), the per-sequence totals always (Ada-KV's are
    exact), and at least 99% of kept tokens agree.
  - Where the kept sets are identical, the caches are identical bit for bit:
    lengths, positions, stored rows (read), stats — RazorAttention's compensation
    row excepted, a mean of doubles summed in another order: within one ulp of
    the storage type.
  - Decode attention where the kept sets agree:
        |gpu − cpu| ≤ 2·(u_o + u_p)·max|v| + (2n + D + 5)·2^-24·max|v|.
    The CPU computes in fp32 and returns fp32; the GPU rounds its output to the
    storage type (≤ u_o·|o| ≤ u_o·max|v|, |o| ≤ max|v| as a convex combination)
    and, on its tensor-core path, the probabilities to that type before P·V (≤ u_p
    relative to each weight: ≤ u_p·max|v| in all); u = 2^-11 (fp16), 2^-8 (bf16),
    0 for fp32 (no rounding of either). The last term is fp32 summation in two
    orders (oracle.py's bound: D + 5 roundings in a logit, 2n + 1 in the softmax
    and P·V over n tokens). For fp16 the first term is 2^-9·max|v| ≈ 2e-3·max|v|,
    combinations_test's bound.
  - Quantizing codecs (int8/int4 KIVI, fp8, layered int4; float32 inputs, layered float16): the device
    encodes the same bytes as the CPU (issue 12), so the same rules hold for kept sets, lengths,
    positions and read-back rows — except RazorAttention's compensation row, whose 1-ulp difference
    may move the codes of its key group and its value row by one quantization step
    (quantization_step) — and decode attention gets quantized_attention_bound (the tensor-core path
    rounds the dequantized tiles and the query to fp16).
"""

import numpy as np
import pytest

import kvtrim
from oracle import kept_by_head, positions_by_head

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kvtrim.has_cuda),
                                reason="needs a GPU and kvtrim built with CUDA")

BATCH, Q_HEADS, KV_HEADS, TOKENS, DIM, WINDOW = 2, 8, 2, 203, 64, 16
APPENDS = 2
PAGE_SIZE = 16
# Inputs are each codec's element type on the device (detail::stored_element): float32 for the
# quantizing codecs (they scale any finite value), float16 for layered<C> (its fp16 rows).
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.float32,
          "int4": torch.float32, "fp8": torch.float32, "layered<int4>": torch.float16}
UNIT = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "fp32": 0.0}
U32 = 2.0 ** -24
CODECS = {"fp16": kvtrim.FP16, "bf16": kvtrim.BF16, "fp32": kvtrim.FP32, "int8": lambda: kvtrim.KIVI(bits=8),
          "int4": lambda: kvtrim.KIVI(bits=4), "fp8": kvtrim.FP8, "layered<int4>": lambda: kvtrim.Layered(kvtrim.KIVI(bits=4))}
QUANTIZING = ("int8", "int4", "fp8", "layered<int4>")
KEY_GROUP = 32  # KIVI's default group: the paged caches of KIVI codecs use pages of whole groups
LAYER, LAYERS = 3, 8  # where the cache sits in the model (Pyramid's schedule, RazorAttention's flags)
RETRIEVAL = [[False, True]] * LAYERS  # kv head 1 keeps everything; head 0 is compressed with a compensation token


def cuda_schemes(low_rank=False):
    """The compiled CUDA list; low-rank schemes (which need bases first: test_cuda_speculative.py) only when asked."""
    if not kvtrim.has_cuda:
        return []
    return [s[1:] for s in kvtrim.schemes() if s[0] == "cuda" and (low_rank or s[4] != "low_rank")]


def make_press(scorer, budget, ratio=0.6):
    inner = {
        "static_window": lambda: kvtrim.StreamingLLM(sinks=4, compression_ratio=ratio),
        "snapkv": lambda: kvtrim.SnapKV(window=WINDOW, kernel=5, compression_ratio=ratio),
        "h2o": lambda: kvtrim.H2O(recent=0.1, compression_ratio=ratio),
        "key_norm": lambda: kvtrim.KeyNorm(compression_ratio=ratio),
        "external": lambda: kvtrim.ExternalScores(compression_ratio=ratio),
        "retrieval_head": lambda: kvtrim.RazorAttention(RETRIEVAL, sinks=4, min_recent=32, recent_fraction=0.1),
    }[scorer]()
    if budget == "adaptive":
        return kvtrim.AdaKV(inner, alpha=0.2)
    if budget == "pyramid":
        return kvtrim.Pyramid(inner)
    return inner


def make_inputs(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(BATCH, KV_HEADS, TOKENS, DIM, generator=g).to(dtype)
    values = torch.randn(BATCH, KV_HEADS, TOKENS, DIM, generator=g).to(dtype)
    queries = torch.randn(BATCH, Q_HEADS, TOKENS, DIM, generator=g).to(dtype)
    new = [(torch.randn(BATCH, KV_HEADS, 1, DIM, generator=g).to(dtype),
            torch.randn(BATCH, KV_HEADS, 1, DIM, generator=g).to(dtype)) for _ in range(APPENDS)]
    decode = torch.randn(BATCH, Q_HEADS, DIM, generator=g).to(dtype)
    # External scores: skewed per head (so Ada-KV moves budget between heads) and
    # quantised to quarters (exact ties, broken to the lower index on both backends).
    skew = torch.arange(BATCH * KV_HEADS, dtype=torch.float32).reshape(BATCH, KV_HEADS, 1)
    scores = torch.round(4 * (torch.randn(BATCH, KV_HEADS, TOKENS, generator=g) + skew)) / 4
    return keys, values, queries, new, decode, scores


def page_size(codec):
    return KEY_GROUP if codec in QUANTIZING else PAGE_SIZE


def capacity(layout, press, codec="fp16"):
    if layout == "contiguous":
        return TOKENS + APPENDS
    heads = BATCH * KV_HEADS
    slots = heads * (TOKENS + APPENDS)
    if codec in QUANTIZING:  # KIVI stores each head's tokens in whole key groups: up to a group more per head
        return slots + heads * KEY_GROUP
    return slots + (heads * PAGE_SIZE if layout == "paged" else 0)


def run(device, layout, scorer, budget, codec, inputs, library="torch"):
    keys, values, queries, new, decode, scores = inputs
    press = make_press(scorer, budget)
    cache = kvtrim.Cache(press, CODECS[codec](), layout, (Q_HEADS, KV_HEADS, DIM), BATCH,
                         capacity(layout, press, codec), device=device, layer=LAYER, layers=LAYERS,
                         page_size=page_size(codec))
    if device == "cuda":
        move = (lambda x: x.cuda()) if library == "torch" else (lambda x: cupy_of(x.cuda()))
    else:
        move = lambda x: x  # noqa: E731 - torch CPU tensors (widened to float32 by the CPU cache)
    window = press.window_queries
    q = None if window == 0 else (queries if window < 0 else queries[:, :, -window:].contiguous())
    cache.compress(move(keys), move(values), None if q is None else move(q),
                   scores=move(scores) if scorer == "external" else None)
    snapshot_after_compress = inspect(cache)
    for k, v in new:
        cache.append(move(k), move(v))
    out = cache.attend(move(decode))
    if device == "cuda":
        torch.cuda.synchronize()
        out = torch.as_tensor(out.get()) if library == "cupy" else out.cpu()
    return snapshot_after_compress, inspect(cache), out.float().numpy()


def cupy_of(tensor):
    import cupy

    return cupy.from_dlpack(tensor)


def inspect(cache):
    heads = len(cache.head_lengths())
    rows = [cache.read(b, h) for b in range(BATCH) for h in range(KV_HEADS)]
    assert len(rows) == heads
    return {"lengths": cache.head_lengths(), "kept": kept_by_head(cache), "positions": positions_by_head(cache),
            "rows": rows, "stats": cache.stats()}


def near_tie(norms, kept):
    """True when a kept and a dropped norm are within 2 float32 ulps (adjacent in sorted order suffices)."""
    order = np.argsort(norms, kind="stable")
    n, label = norms[order], kept[order]
    close = (n[1:] - n[:-1]) <= 2 * np.spacing(n[1:])
    return bool(np.any(close & (label[1:] != label[:-1])))


def key_norm_ties(keys, kept_cpu, budget):
    """Flattened heads whose key-norm kept set may differ between backends by 1-ulp scores."""
    norms = np.sqrt((keys.double().numpy() ** 2).sum(axis=-1)).astype(np.float32)  # [B, H, T], one rounding
    mask = np.zeros(norms.shape, dtype=bool)
    for head, tokens in enumerate(kept_cpu):
        mask[head // KV_HEADS, head % KV_HEADS, tokens] = True
    tied = set()
    for b in range(BATCH):
        if budget == "adaptive":  # one budget for the sequence's heads: ties across heads count
            if near_tie(norms[b].ravel(), mask[b].ravel()):
                tied |= {b * KV_HEADS + h for h in range(KV_HEADS)}
        else:
            tied |= {b * KV_HEADS + h for h in range(KV_HEADS) if near_tie(norms[b, h], mask[b, h])}
    return tied


def compare_kept(scorer, budget, cpu, gpu, keys):
    """The kept-set rule of the module docstring; True where the kept sets are identical."""
    lengths_cpu, lengths_gpu = cpu["lengths"], gpu["lengths"]
    for b in range(BATCH):  # per-sequence totals: always
        part = slice(b * KV_HEADS, (b + 1) * KV_HEADS)
        assert lengths_cpu[part].sum() == lengths_gpu[part].sum(), f"sequence {b}"
    if scorer in ("static_window", "external", "retrieval_head"):
        assert gpu["kept"] == cpu["kept"]
        return True
    if scorer == "key_norm":
        tied = key_norm_ties(keys, cpu["kept"], budget)
        for head in range(BATCH * KV_HEADS):
            if head not in tied:
                assert gpu["kept"][head] == cpu["kept"][head], f"head {head}"
        return gpu["kept"] == cpu["kept"]
    if budget != "adaptive":  # counts that do not depend on near-ties
        assert np.array_equal(lengths_cpu, lengths_gpu)
    cpu_set = {(h, t) for h, head in enumerate(cpu["kept"]) for t in head}
    gpu_set = {(h, t) for h, head in enumerate(gpu["kept"]) for t in head}
    assert len(cpu_set & gpu_set) >= 0.99 * len(cpu_set), f"{len(cpu_set & gpu_set)} of {len(cpu_set)} kept tokens agree"
    return cpu_set == gpu_set


def quantization_step(codec, rows, axis):
    """One code step of `codec` over `rows` [n, D] (the largest a 1-ulp change of an input can move a
    dequantized element, plus the element's own half step on each side): KIVI keys share scales per
    channel over a group (axis 0), values per token (axis 1) — a range over the whole head bounds
    the group's; b bits span (2^b − 1) steps. fp8 (e4m3, 3 mantissa bits): one step ≤ 2^-3·|x| above
    the subnormals, whose step is 2^-9·scale, scale = amax/448 (head_amax)."""
    if codec == "fp8":
        return 2.0 ** -3 * np.abs(rows) + 2.0 ** -9 * np.abs(rows).max() / 448.0
    bits = 4 if "int4" in codec else 8
    spread = rows.max(axis=axis, keepdims=True) - rows.min(axis=axis, keepdims=True)
    return np.broadcast_to(spread / (2 ** bits - 1), rows.shape) * (1 + 2.0 ** -20)


def compare_caches(layout, scorer, cpu, gpu, codec):
    """Bit for bit where the kept sets agree (RazorAttention's compensation row within one storage ulp;
    with a quantizing codec, that row's 1-ulp difference can move the codes of its key group and its
    own value row by one step: those rows within one quantization step)."""
    assert np.array_equal(gpu["lengths"], cpu["lengths"])
    assert gpu["positions"] == cpu["positions"]
    for head, ((ck, cv), (gk, gv)) in enumerate(zip(cpu["rows"], gpu["rows"])):
        if scorer == "retrieval_head" and not RETRIEVAL[LAYER][head % KV_HEADS] and codec in QUANTIZING:
            assert np.all(np.abs(gk - ck) <= quantization_step(codec, ck, 0)), f"head {head} keys"
            assert np.all(np.abs(gv - cv) <= quantization_step(codec, cv, 1)), f"head {head} values"
        elif scorer == "retrieval_head" and not RETRIEVAL[LAYER][head % KV_HEADS]:
            compensation = 4  # the row after the sinks holds the dropped tokens' mean
            ulp = 2 * (UNIT[codec] or U32)
            for c, g in ((ck, gk), (cv, gv)):
                assert np.all(np.abs(g[compensation] - c[compensation]) <= ulp * np.abs(c[compensation]) + 1e-30)
                c, g = np.delete(c, compensation, axis=0), np.delete(g, compensation, axis=0)
                assert np.array_equal(g, c), f"head {head}"
        else:
            assert np.array_equal(gk, ck) and np.array_equal(gv, cv), f"head {head}"
    for field in ("codec", "head_dim", "bytes_per_token", "bytes_per_head", "kept", "bytes", "total_bytes",
                  "fp16_bytes", "ratio", "table"):
        assert gpu["stats"][field] == cpu["stats"][field], field
    # The allocation: the same carve, except that a device contiguous cache keeps its one
    # length in host memory (layout/contiguous.hpp), one 256-byte-aligned int64 less.
    allocated_cpu, allocated_gpu = cpu["stats"]["allocated_bytes"], gpu["stats"]["allocated_bytes"]
    assert allocated_cpu - allocated_gpu == (256 if layout == "contiguous" else 0)


@pytest.mark.parametrize("layout,scorer,budget,codec", cuda_schemes(), ids=lambda x: str(x))
def test_cuda_scheme_equals_the_cpu_scheme(layout, scorer, budget, codec):
    inputs = make_inputs(7, DTYPES[codec])
    cpu_compressed, cpu_final, cpu_out = run("cpu", layout, scorer, budget, codec, inputs)
    gpu_compressed, gpu_final, gpu_out = run("cuda", layout, scorer, budget, codec, inputs)
    identical = compare_kept(scorer, budget, cpu_compressed, gpu_compressed, inputs[0])
    if not identical:
        pytest.skip("kept sets differ at near-ties (allowed above); the caches differ by design, nothing more to compare")
    compare_caches(layout, scorer, cpu_compressed, gpu_compressed, codec)
    compare_caches(layout, scorer, cpu_final, gpu_final, codec)  # after the appends: each head's next rows and positions
    max_value = float(inputs[1].float().abs().max())
    held = int(gpu_final["lengths"].max())
    if codec in QUANTIZING:  # a bound per (sequence, query head): [B, H_q, 1]
        bound = quantized_attention_bound(codec, inputs[4], cpu_final["rows"], held)
        error = np.abs(gpu_out - cpu_out.reshape(gpu_out.shape))
        assert np.all(error <= bound), f"worst |gpu − cpu| {error.max():.3e}, bound there {np.broadcast_to(bound, error.shape).flat[error.argmax()]:.3e}"
        return
    bound = 2 * (UNIT[codec] + UNIT[codec]) * max_value + (2 * held + DIM + 5) * U32 * max_value
    np.testing.assert_allclose(gpu_out, cpu_out, rtol=0, atol=bound)


def quantized_attention_bound(codec, decode, rows, held):
    """|gpu − cpu| for a quantizing codec, per (b, j). Both attend over the same stored codes; the CPU
    dequantizes to fp32 and computes in fp32; the GPU (GQA group 4: the tensor-core path) dequantizes
    each tile into fp16 and rounds the query to fp16 too (u = 2^-11 each), so a logit moves by at most
    2u·L, L = max_i Σ_d |q_d k_id| / √D, and the weights by a factor within e^{±2·2uL}; the values
    rounded to fp16 (u·max|v|), the weights to fp16 before P·V (u·max|v|), the output to the input
    type (float32: none; layered: fp16, u·max|v|), plus fp32 summation in two orders as above."""
    u = 2.0 ** -11
    out_unit = u if DTYPES[codec] == torch.float16 else 0.0
    q = decode.float().numpy().astype(np.float64)
    group = Q_HEADS // KV_HEADS
    bound = np.empty((BATCH, Q_HEADS, 1))
    for b in range(BATCH):
        for j in range(Q_HEADS):
            k, v = (np.asarray(x, np.float64) for x in rows[b * KV_HEADS + j // group])
            largest_logit = (np.abs(k * q[b, j]).sum(axis=1) / np.sqrt(DIM)).max()
            largest_value = np.abs(v).max()
            bound[b, j, 0] = (np.expm1(4 * u * largest_logit) + 2 * u + out_unit
                              + (2 * held + DIM + 5) * U32) * largest_value
    return bound


def test_the_cuda_list():
    listed = set(cuda_schemes(low_rank=True))
    assert len(listed) == 115  # python/src/registry_cuda.cuh: 19 contiguous + 30 flat + 30 paged + 32 quantizing + 4 low-rank
    for layout in ("contiguous", "flat", "paged"):
        budgets = ("uniform", "pyramid") if layout == "contiguous" else ("uniform", "adaptive", "pyramid")
        for scorer in ("static_window", "snapkv", "h2o", "key_norm"):
            for budget in budgets:
                for codec in ("fp16", "bf16"):
                    assert (layout, scorer, budget, codec) in listed
    for layout in ("flat", "paged"):
        assert {(layout, "retrieval_head", "by_scorer", c) for c in ("fp16", "bf16")} <= listed
        assert {(layout, "external", b, c) for b in ("uniform", "adaptive") for c in ("fp16", "bf16")} <= listed
    assert ("contiguous", "external", "uniform", "fp16") in listed
    assert ("contiguous", "static_window", "uniform", "fp32") in listed
    presses = (("static_window", "uniform"), ("snapkv", "uniform"), ("snapkv", "adaptive"), ("retrieval_head", "by_scorer"))
    quantizing = {(layout, scorer, budget, codec) for layout in ("flat", "paged") for scorer, budget in presses
                  for codec in QUANTIZING}
    assert quantizing <= listed
    assert {s for s in listed if s[3] in QUANTIZING} == quantizing
    assert {s for s in listed if s[3] == "low_rank"} == {("flat", scorer, budget, "low_rank") for scorer, budget in presses}


def test_cupy_arrays_into_a_ragged_cuda_cache():
    pytest.importorskip("cupy")
    scheme = ("paged", "snapkv", "adaptive", "fp16")
    inputs = make_inputs(11, torch.float16)
    _, via_torch, out_torch = run("cuda", *scheme, inputs)
    _, via_cupy, out_cupy = run("cuda", *scheme, inputs, library="cupy")
    # The same device code on the same bits: identical caches and outputs.
    assert via_cupy["kept"] == via_torch["kept"] and via_cupy["positions"] == via_torch["positions"]
    for (a, b), (c, d) in zip(via_cupy["rows"], via_torch["rows"]):
        assert np.array_equal(a, c) and np.array_equal(b, d)
    assert np.array_equal(out_cupy, out_torch)


def test_read_back_waits_for_the_callers_stream():
    # compress and append on a side stream, inspect without synchronising first:
    # the read-back copies on the cache's last stream and waits for it.
    inputs = make_inputs(5, torch.float16)
    keys, values, _, new, _, _ = inputs
    press = kvtrim.AdaKV(kvtrim.KeyNorm(compression_ratio=0.5))
    cpu = kvtrim.Cache(press, kvtrim.FP16(), "flat", (Q_HEADS, KV_HEADS, DIM), BATCH, capacity("flat", press))
    cpu.compress(keys, values)
    cpu.append(*new[0])
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        gpu = kvtrim.Cache(press, kvtrim.FP16(), "flat", (Q_HEADS, KV_HEADS, DIM), BATCH, capacity("flat", press),
                           device="cuda")
        k, v, nk, nv = (x.cuda() for x in (keys, values, *new[0]))
        gpu.compress(k, v)
        gpu.append(nk, nv)
        assert np.array_equal(gpu.head_lengths(), cpu.head_lengths())
        assert positions_by_head(gpu) == positions_by_head(cpu)
        assert kept_by_head(gpu) == kept_by_head(cpu)


def test_uncompiled_codec_schemes_on_cuda_are_refused_clearly():
    with pytest.raises(kvtrim.Error, match=r"int8, int4, fp8 and layered<int4> are compiled with StreamingLLM, SnapKV, "
                                           r"Ada-SnapKV and RazorAttention.*got device=cuda layout=flat scorer=h2o "
                                           r"budget=adaptive codec=int8"):
        kvtrim.Cache(kvtrim.AdaKV(kvtrim.H2O(compression_ratio=0.5)), kvtrim.KIVI(), "flat", (4, 2, 64), 1, 256,
                     device="cuda")
    with pytest.raises(kvtrim.Error, match=r"a compiled CUDA low_rank scheme: LowRank \(profile or sequence bases\) with "
                                           r"StreamingLLM, SnapKV, Ada-SnapKV and RazorAttention on the flat layout.*"
                                           r"got device=cuda layout=paged scorer=snapkv"):
        kvtrim.Cache(kvtrim.SnapKV(compression_ratio=0.5), kvtrim.LowRank(rank=8, source="profile"), "paged",
                     (4, 2, 64), 1, 256, device="cuda")


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
def test_one_token_views_whose_extent_one_strides_differ(layout):
    # HF's decode step: keys [B, H, 1, D] out of RoPE and values, a transposed projection,
    # both torch-"contiguous" but with different strides on the extent-1 token axis.
    # The binding gives extent-1 axes their canonical stride, so both read the same.
    inputs = make_inputs(3, torch.float16)
    keys, values = inputs[0].cuda(), inputs[1].cuda()
    press = kvtrim.StreamingLLM(sinks=4, compression_ratio=0.5)
    cache = kvtrim.Cache(press, kvtrim.FP16(), layout, (Q_HEADS, KV_HEADS, DIM), BATCH, capacity(layout, press),
                         device="cuda", page_size=PAGE_SIZE)
    cache.compress(keys, values)
    before = cache.head_lengths().copy()
    k = torch.randn(BATCH, KV_HEADS, 1, DIM, device="cuda").half()                     # strides (H·D, D, D, 1)
    v = torch.randn(BATCH, 1, KV_HEADS, DIM, device="cuda").half().transpose(1, 2)    # strides (H·D, D, H·D, 1)
    assert k.is_contiguous() and v.is_contiguous() and k.stride() != v.stride()
    cache.append(k, v)
    assert np.array_equal(cache.head_lengths(), before + 1)
    for b in range(BATCH):
        for h in range(KV_HEADS):
            rows_k, rows_v = cache.read(b, h)
            assert np.array_equal(rows_k[-1], k[b, h, 0].float().cpu().numpy())
            assert np.array_equal(rows_v[-1], v[b, h, 0].float().cpu().numpy())


# ---- refusals the device records in the cache's status words (kvtrim::check_status) ---------------
#
# A device paged/flat call that the CPU would refuse (a NaN/Inf input, the pool exhausted) writes
# nothing and records the failure; the binding raises it as kvtrim.Error with the CPU's message —
# after every compress/append (check="sync", the default) or at check_status() and the next
# inspection call (check="deferred"). Either way the cache is as it was, and the next good call works.

STATUS_SHAPE, STATUS_BATCH, STATUS_TOKENS, STATUS_KEEP = (8, 2, 64), 2, 45, 20


def status_caches(layout, check="sync", capacity=None, press=None):
    press = press or (lambda: kvtrim.StreamingLLM(sinks=4, tokens=STATUS_KEEP))  # exact kept sets on both
    room = capacity or STATUS_BATCH * STATUS_SHAPE[1] * (STATUS_KEEP + 2 * PAGE_SIZE)
    make = lambda device, mode: kvtrim.Cache(press(), kvtrim.FP16(), layout, STATUS_SHAPE, STATUS_BATCH,  # noqa: E731
                                             room, device=device, page_size=PAGE_SIZE, check=mode)
    return make("cpu", "sync"), make("cuda", check)


def status_inputs(seed, tokens):
    g = torch.Generator().manual_seed(seed)
    shape = (STATUS_BATCH, STATUS_SHAPE[1], tokens, STATUS_SHAPE[2])
    return torch.randn(*shape, generator=g).half(), torch.randn(*shape, generator=g).half()


def snapshot(cache):
    rows = [cache.read(b, h) for b in range(STATUS_BATCH) for h in range(STATUS_SHAPE[1])]
    return {"lengths": cache.head_lengths().tolist(), "positions": positions_by_head(cache),
            "kept": kept_by_head(cache), "rows": [(k.tobytes(), v.tobytes()) for k, v in rows]}


def refusal(call):
    with pytest.raises(kvtrim.Error) as raised:
        call()
    return str(raised.value)


@pytest.mark.parametrize("layout", ["flat", "paged"])
@pytest.mark.parametrize("check", ["sync", "deferred"])
@pytest.mark.parametrize("entry", ["compress", "append"])
def test_a_non_finite_input_is_refused_with_the_cpus_error_and_the_cache_intact(layout, check, entry):
    cpu, gpu = status_caches(layout, check)
    keys, values = status_inputs(11, STATUS_TOKENS)
    for cache, move in ((cpu, lambda x: x), (gpu, lambda x: x.cuda())):
        cache.compress(move(keys), move(values))
    assert snapshot(gpu) == snapshot(cpu)
    before = snapshot(gpu)
    bad_keys, bad_values = status_inputs(12, STATUS_TOKENS if entry == "compress" else 3)
    bad_keys[1, 1, bad_keys.shape[2] - 2, 37] = float("nan")  # one element of one head's keys
    call = lambda cache, move: getattr(cache, entry)(move(bad_keys), move(bad_values))  # noqa: E731
    expected = refusal(lambda: call(cpu, lambda x: x))
    assert "NaN and Inf are refused" in expected
    if check == "sync":
        assert refusal(lambda: call(gpu, lambda x: x.cuda())) == expected
    else:
        call(gpu, lambda x: x.cuda())  # nothing synchronises: the refusal waits for the check
        assert refusal(gpu.check_status) == expected
        gpu.check_status()  # the record was cleared
    assert snapshot(gpu) == before  # lengths, positions, kept selection, stored rows: every byte
    good_keys, good_values = status_inputs(13, 2)
    for cache, move in ((cpu, lambda x: x), (gpu, lambda x: x.cuda())):
        cache.append(move(good_keys), move(good_values))
    gpu.check_status()
    assert snapshot(gpu) == snapshot(cpu)


def test_a_deferred_refusal_surfaces_at_the_next_inspection():
    cpu, gpu = status_caches("paged", "deferred")
    keys, values = status_inputs(21, STATUS_TOKENS)
    cpu.compress(keys, values)
    gpu.compress(keys.cuda(), values.cuda())
    bad_keys, bad_values = status_inputs(22, 1)
    bad_values[0, 0, 0, 0] = float("inf")
    expected = refusal(lambda: cpu.append(bad_keys, bad_values))
    gpu.append(bad_keys.cuda(), bad_values.cuda())
    assert refusal(gpu.head_lengths) == expected
    assert gpu.head_lengths().tolist() == cpu.head_lengths().tolist()


@pytest.mark.parametrize("check", ["sync", "deferred"])
def test_paged_pool_exhaustion_is_refused_with_the_cpus_error_and_the_cache_intact(check):
    # Exactly the compressed tokens' pages: each head holds STATUS_KEEP = 20 tokens, two pages of 16
    # with 12 free slots in its last page, so 12 appended tokens fit and a 13th needs a page.
    heads = STATUS_BATCH * STATUS_SHAPE[1]
    cpu, gpu = status_caches("paged", check, capacity=heads * 2 * PAGE_SIZE)
    keys, values = status_inputs(31, STATUS_TOKENS)
    cpu.compress(keys, values)
    gpu.compress(keys.cuda(), values.cuda())
    fits_keys, fits_values = status_inputs(32, 2 * PAGE_SIZE - STATUS_KEEP)
    for cache, move in ((cpu, lambda x: x), (gpu, lambda x: x.cuda())):
        cache.append(move(fits_keys), move(fits_values))
    gpu.check_status()
    before = snapshot(gpu)
    assert before == snapshot(cpu)
    more_keys, more_values = status_inputs(33, 1)
    expected = refusal(lambda: cpu.append(more_keys, more_values))
    assert "pool exhausted" in expected
    if check == "sync":
        assert refusal(lambda: gpu.append(more_keys.cuda(), more_values.cuda())) == expected
    else:
        gpu.append(more_keys.cuda(), more_values.cuda())
        assert refusal(gpu.check_status) == expected
    assert snapshot(gpu) == before
    # The cache still works: a new prompt replaces what it held.
    for cache, move in ((cpu, lambda x: x), (gpu, lambda x: x.cuda())):
        cache.compress(move(keys), move(values))
    assert snapshot(gpu) == snapshot(cpu)


@pytest.mark.parametrize("layout", ["flat", "paged"])
def test_adakv_paper_form_over_budget_is_refused_with_the_cpus_error(layout):
    # Ada-KV's paper form (kvpress_compatible=False) refuses a head whose protected (+inf) tokens exceed
    # the per-head budget; the device's budget records it and compaction refuses (combinations_test.cu).
    press = lambda: kvtrim.AdaKV(kvtrim.ExternalScores(tokens=12), alpha=0.2, kvpress_compatible=False)  # noqa: E731
    cpu, gpu = status_caches(layout, press=press)
    keys, values = status_inputs(41, STATUS_TOKENS)
    scores = torch.randn(STATUS_BATCH, STATUS_SHAPE[1], STATUS_TOKENS, generator=torch.Generator().manual_seed(42))
    scores = torch.round(4 * scores) / 4  # quarters: ties broken alike on both backends
    cpu.compress(keys, values, scores=scores)
    gpu.compress(keys.cuda(), values.cuda(), scores=scores.cuda())
    before = snapshot(gpu)
    assert before == snapshot(cpu)
    over = scores.clone()
    over[1, 1, 1::3] = float("inf")  # 15 protected tokens in one head, over its budget of 12
    expected = refusal(lambda: cpu.compress(keys, values, scores=over))
    assert "tokens the scorer protects" in expected
    assert refusal(lambda: gpu.compress(keys.cuda(), values.cuda(), scores=over.cuda())) == expected
    assert snapshot(gpu) == before


# ---- decode-time eviction on CUDA against its CPU twin (kvtrim.Eviction, eviction_cuda.cu) ------------
#
# Both twins get the same fp16 inputs (the CPU's float32 are the fp16 values), StreamingLLM's prefill
# compression (exact kept sets on both backends), then decode steps of append + Eviction.attend, with an
# eviction step every INTERVAL steps. Checked at every step:
#   - attention within test_cuda's fp16 bound (module docstring; n ≤ EV_KEEP tokens a head), plus the
#     logits' own error through the softmax;
#   - the metric, slot by slot (both backends hand out the same page ids, and set every slot that holds
#     no token to 0), within the relative error of its terms: eviction_test.cu's first-order budgets
#     with S ≤ max‖q‖·max‖k‖/√D (Cauchy–Schwarz bounds Σ_d |q_d k_d|) —
#       seed   ε = 4(D + 5)·u·S + (T + 136)·u, p² off by ≤ expm1(4ε), its G·w-term sum by 2(G·w + 2)·u more;
#       decode ε = (D + 5)·u·S + (n + 3(n/64 + 1) + 4)·u                          (the CPU's exponent error)
#                + (D + 8)·u·S + (n + 3(n/256 + 2) + 4)·u + 2u·(S + ln n + 1)     (the GPU's),
#              p² off by ≤ expm1(2ε), the group sum and += by 2(G + 2)·u of (contribution + start);
#     every term is ≥ 0 and both are ≤ the metric, so each is a relative bound on the metric;
#   - then the CPU's metric is copied into the device's (every step: each step's comparison starts
#     from equal metrics), so both eviction steps see the same floats: the evicted sets, positions,
#     stored rows (read back) and metrics must then be equal exactly, and the reports.
EV_B, EV_HQ, EV_HKV, EV_D, EV_T, EV_LAYERS = 2, 8, 2, 64, 97, 2
EV_WINDOW, EV_SINKS, EV_PROTECTED, EV_KEEP, EV_INTERVAL, EV_STEPS, EV_PAGE = 8, 2, 8, 48, 8, 24, 16


def metric_relative_bound(queries, keys):
    u, d, n, group = 2.0 ** -24, EV_D, EV_KEEP, EV_HQ // EV_HKV
    norm = lambda arrays: max(np.linalg.norm(a.astype(np.float64), axis=-1).max() for a in arrays)  # noqa: E731
    largest = norm(queries) * norm(keys) / np.sqrt(d)
    seed = np.expm1(4 * (4 * (d + 5) * u * largest + (EV_T + 136) * u)) + 2 * (group * EV_WINDOW + 2) * u
    cpu = (d + 5) * u * largest + (n + 3 * (n / 64 + 1) + 4) * u
    gpu = (d + 8) * u * largest + (n + 3 * (n / 256 + 2) + 4) * u + 2 * u * (largest + np.log(n) + 1)
    decode = np.expm1(2 * (cpu + gpu)) + 2 * 2 * (group + 2) * u
    return max(seed, decode)


@pytest.mark.parametrize("scope", ["per_head", "cross_layer"])
def test_cuda_eviction_equals_its_cpu_twin(scope):
    rng = np.random.default_rng(5)
    half = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    keys = [half(EV_B, EV_HKV, EV_T, EV_D) for _ in range(EV_LAYERS)]
    values = [half(EV_B, EV_HKV, EV_T, EV_D) for _ in range(EV_LAYERS)]
    window = [half(EV_B, EV_HQ, EV_WINDOW, EV_D) for _ in range(EV_LAYERS)]
    capacity = EV_B * EV_HKV * (EV_KEEP + EV_PAGE * 2)
    twins = {}
    for device in ("cpu", "cuda"):
        caches = [kvtrim.Cache(kvtrim.StreamingLLM(sinks=EV_SINKS, tokens=EV_KEEP - EV_INTERVAL), kvtrim.FP16(),
                               "paged", (EV_HQ, EV_HKV, EV_D), EV_B, capacity, device=device, layer=l,
                               layers=EV_LAYERS, page_size=EV_PAGE) for l in range(EV_LAYERS)]
        eviction = kvtrim.Eviction(caches, keep=EV_KEEP, interval=EV_INTERVAL, scope=scope, sinks=EV_SINKS,
                                   protected_window=EV_PROTECTED)
        for l, cache in enumerate(caches):
            if device == "cpu":
                cache.compress(keys[l].astype(np.float32), values[l].astype(np.float32))
                eviction.seed(l, keys[l].astype(np.float32), window[l].astype(np.float32))
            else:
                cache.compress(torch.from_numpy(keys[l]).cuda(), torch.from_numpy(values[l]).cuda())
                eviction.seed(l, torch.from_numpy(keys[l]).cuda(), torch.from_numpy(window[l]).cuda())
        twins[device] = (caches, eviction)
    (cpu_caches, cpu_eviction), (gpu_caches, gpu_eviction) = twins["cpu"], twins["cuda"]
    seen_queries, seen_keys = list(window), list(keys)

    def compare_metrics(steps):
        relative = metric_relative_bound(seen_queries, seen_keys)
        for l in range(EV_LAYERS):
            want = cpu_eviction.metrics[l].astype(np.float64)
            have = gpu_eviction.metrics[l].cpu().numpy().astype(np.float64)
            assert np.count_nonzero(want) > 0
            assert np.all(np.abs(have - want) <= relative * np.abs(want) + 1e-38), (l, steps)
            gpu_eviction.metrics[l].copy_(torch.from_numpy(cpu_eviction.metrics[l]))

    compare_metrics(0)
    evicted = 0
    for step in range(1, EV_STEPS + 1):
        for l in range(EV_LAYERS):
            k, v, q = half(EV_B, EV_HKV, 1, EV_D), half(EV_B, EV_HKV, 1, EV_D), half(EV_B, EV_HQ, EV_D)
            seen_keys.append(k)
            seen_queries.append(q)
            cpu_caches[l].append(k.astype(np.float32), v.astype(np.float32))
            gpu_caches[l].append(torch.from_numpy(k).cuda(), torch.from_numpy(v).cuda())
            want = cpu_eviction.attend(l, q.astype(np.float32))
            have = gpu_eviction.attend(l, torch.from_numpy(q).cuda()).float().cpu().numpy()
            largest_value = max(np.abs(cpu_caches[l].read(b, h)[1]).max() for b in range(EV_B) for h in range(EV_HKV))
            n = cpu_caches[l].head_lengths().max()
            # test_cuda's fp16 bound, plus both backends' logit error (δ = (D + 8)·u·S each side, S by
            # Cauchy–Schwarz as for the metric) through the softmax: ≤ expm1(2·2δ)·max|v|.
            logit = (np.linalg.norm(q.astype(np.float64), axis=-1).max() *
                     max(np.linalg.norm(a.astype(np.float64), axis=-1).max() for a in seen_keys) / np.sqrt(EV_D))
            bound = (2 * (UNIT["fp16"] + UNIT["fp16"]) + (2 * n + EV_D + 5) * U32 +
                     np.expm1(4 * (EV_D + 8) * U32 * logit)) * largest_value
            assert np.all(np.abs(have - want) <= bound), (step, l)
        compare_metrics(step)
        if cpu_eviction.due(step):
            want, have = cpu_eviction.step(), gpu_eviction.step()
            assert have == want
            evicted += want["evicted_tokens"]
            for l in range(EV_LAYERS):
                assert gpu_caches[l].head_lengths().tolist() == cpu_caches[l].head_lengths().tolist()
                assert positions_by_head(gpu_caches[l]) == positions_by_head(cpu_caches[l])
                for b in range(EV_B):
                    for h in range(EV_HKV):
                        got, expected = gpu_caches[l].read(b, h), cpu_caches[l].read(b, h)
                        assert got[0].tobytes() == expected[0].tobytes() and got[1].tobytes() == expected[1].tobytes()
                assert np.array_equal(gpu_eviction.metrics[l].cpu().numpy(), cpu_eviction.metrics[l])
    assert evicted > 0
