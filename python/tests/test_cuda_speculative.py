"""Speculative decoding and profile low-rank bases on CUDA against the same calls on the CPU (skipped without
torch, a GPU or a CUDA build).

Every check compares a CUDA cache with its CPU twin fed the same inputs (test_cuda.py's rules):
  - Cache.truncate: the device rolls back what the CPU rolls back, so after compress, append(drafts),
    a multi-query attend, truncate(drop) and one more append, lengths, positions and read-back rows
    are equal bit for bit (the device encodes the CPU's bytes: issue 12). Refusals raise the CPU's
    message word for word and leave the cache as it was (paged/flat: from the status words, at once
    with check="sync", at check_status() with "deferred").
  - Multi-query attend [B, H_q, L, D] against the CPU's within test_cuda.py's decode bounds, row by row
    (each row's visible tokens are a subset of the head's, so the bound over all of them holds), and
    against test_speculative.py's float64 causal oracle within its bound plus those device terms.
  - LowRank(source="profile"): set_basis installs the same bases; the device encodes the CPU's
    coefficients bit for bit (codec_low_rank.cuh: the CPU's summation order, no fma), so read()
    and low_rank() agree exactly (RazorAttention's compensation row: its mean of doubles is summed
    in another order, so its coefficients within one fp16 ulp); decode attention within
    low_rank_attention_bound below.
"""

import numpy as np
import pytest

import kvtrim
from test_speculative import causal_oracle
from test_cuda import (BATCH, DIM, KV_HEADS, LAYER, LAYERS, Q_HEADS, QUANTIZING, RETRIEVAL, U32, UNIT, compare_kept,
                       inspect, make_press, quantized_attention_bound)

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kvtrim.has_cuda),
                                reason="needs a GPU and kvtrim built with CUDA")

TOKENS, KEEP, DRAFTS, RANK = 96, 40, 4, 16
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.float32,
          "int4": torch.float32, "fp8": torch.float32, "layered<int4>": torch.float16}
CODECS = {"fp16": kvtrim.FP16, "bf16": kvtrim.BF16, "fp32": kvtrim.FP32, "int8": lambda: kvtrim.KIVI(bits=8),
          "int4": lambda: kvtrim.KIVI(bits=4), "fp8": kvtrim.FP8, "layered<int4>": lambda: kvtrim.Layered(kvtrim.KIVI(bits=4))}
# StreamingLLM's CUDA schemes (registry_cuda.cuh) with a CPU twin.
CASES = ([("contiguous", c) for c in ("fp16", "bf16", "fp32")]
         + [(layout, c) for layout in ("flat", "paged") for c in ("fp16", "bf16", "int8", "int4", "fp8", "layered<int4>")])
# Multi-query attend on CUDA reads fp16/bf16 and the quantizing codecs' storage (decode_attention.cuh
# multi_query_codec); fp32 caches attend one query per sequence there.
MULTI_QUERY = ("fp16", "bf16", "int8", "int4", "fp8", "layered<int4>")
DEVICE_ROLLBACK_REFUSAL = "kvtrim.Cache.truncate: argument 'cache': expected a scheme whose codec rolls back on its device"


def make_cache(device, layout, codec, check="sync"):
    capacity = KEEP + 2 * DRAFTS + 8 if layout == "contiguous" else BATCH * KV_HEADS * (KEEP + 2 * DRAFTS + 64)
    return kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, tokens=KEEP), CODECS[codec](), layout, (Q_HEADS, KV_HEADS, DIM),
                        BATCH, capacity, device=device, page_size=32 if codec in QUANTIZING else 16, check=check)


def make_inputs(seed, dtype, rows=DRAFTS + 1):
    g = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(BATCH, KV_HEADS, TOKENS, DIM, generator=g).to(dtype) for _ in range(2))
    new_keys, new_values = (torch.randn(BATCH, KV_HEADS, rows, DIM, generator=g).to(dtype) for _ in range(2))
    queries = torch.randn(BATCH, Q_HEADS, rows, DIM, generator=g).to(dtype)
    return keys, values, new_keys, new_values, queries


def on(device, x):
    return x.cuda() if device == "cuda" else x


def host(out):
    """A cache's output (torch, either device) as a float32 NumPy array."""
    if out.is_cuda:
        torch.cuda.synchronize()
    return out.float().cpu().numpy()


def same_state(cpu, gpu):
    assert np.array_equal(gpu["lengths"], cpu["lengths"])
    assert gpu["positions"] == cpu["positions"]
    for head, ((ck, cv), (gk, gv)) in enumerate(zip(cpu["rows"], gpu["rows"])):
        assert np.array_equal(gk, ck) and np.array_equal(gv, cv), f"head {head}"


def decode_bound(codec, queries, rows, held):
    """test_cuda.py's bound for one query row per sequence [B, H_q, D] (torch, host)."""
    if codec in QUANTIZING:
        return quantized_attention_bound(codec, queries, rows, held)
    max_value = max(float(np.abs(v).max()) for _, v in rows)
    return 2 * (2 * UNIT[codec]) * max_value + (2 * held + DIM + 5) * U32 * max_value


def assert_attend_close(codec, cpu_out, gpu_out, queries, rows):
    held = max(len(k) for k, _ in rows)
    if gpu_out.ndim == 3:
        gpu_out, cpu_out, queries = gpu_out[:, :, None], cpu_out[:, :, None], queries[:, :, None]
    for i in range(gpu_out.shape[2]):
        bound = decode_bound(codec, queries[:, :, i], rows, held)
        error = np.abs(gpu_out[:, :, i] - cpu_out[:, :, i])
        assert np.all(error <= bound), f"row {i}: worst {error.max():.3e}"


@pytest.mark.parametrize("layout,codec", CASES, ids=lambda x: str(x))
def test_truncate_on_cuda_equals_the_cpu(layout, codec):
    keys, values, new_keys, new_values, queries = make_inputs(21, DTYPES[codec])
    drop = [2, 2] if layout == "contiguous" else [1, 3]
    verify = queries[:, :, :DRAFTS] if codec in MULTI_QUERY else queries[:, :, DRAFTS - 1].contiguous()
    caches, outs, states = {}, {}, {}
    for device in ("cpu", "cuda"):
        cache = caches[device] = make_cache(device, layout, codec)
        cache.compress(on(device, keys), on(device, values))
        cache.append(on(device, new_keys[:, :, :DRAFTS]), on(device, new_values[:, :, :DRAFTS]))
        outs[device] = [cache.attend(on(device, verify))]  # the verifier's pass over the drafts
    assert_attend_close(codec, host(outs["cpu"][0]), host(outs["cuda"][0]), verify, inspect(caches["cpu"])["rows"])
    before = inspect(caches["cuda"])
    try:
        caches["cuda"].truncate(drop)
    except kvtrim.Error as error:
        # backend/cuda/rollback.cuh refuses layered on the device at compile time (the binding then
        # refuses at run time, before anything is written).
        assert codec == "layered<int4>" and str(error).startswith(DEVICE_ROLLBACK_REFUSAL)
        same_state(before, inspect(caches["cuda"]))
        return
    caches["cpu"].truncate(drop)
    for device, cache in caches.items():
        states[device] = [inspect(cache)]
        cache.append(on(device, new_keys[:, :, DRAFTS:]), on(device, new_values[:, :, DRAFTS:]))
        states[device].append(inspect(cache))
        outs[device] = [cache.attend(on(device, queries[:, :, 0].contiguous()))]
        if codec in MULTI_QUERY:
            outs[device].append(cache.attend(on(device, queries[:, :, :2].contiguous())))
    for cpu, gpu in zip(states["cpu"], states["cuda"]):
        same_state(cpu, gpu)
    assert list(states["cpu"][1]["lengths"]) == [KEEP + DRAFTS - drop[b] + 1 for b in range(BATCH) for _ in range(KV_HEADS)]
    rows = states["cpu"][1]["rows"]
    assert_attend_close(codec, host(outs["cpu"][0]), host(outs["cuda"][0]), queries[:, :, 0], rows)
    if codec in MULTI_QUERY:
        assert_attend_close(codec, host(outs["cpu"][1]), host(outs["cuda"][1]), queries[:, :, :2], rows)


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
def test_every_form_of_drop_on_cuda(layout):
    keys, values, new_keys, new_values, _ = make_inputs(22, torch.float16)
    forms = [2, [2, 2], np.array([2, 2]), torch.tensor([2, 2], dtype=torch.int32),
             torch.tensor([2, 2], dtype=torch.int32, device="cuda"),
             torch.tensor([2, 7, 2, 7], dtype=torch.int32, device="cuda")[::2]]
    results = []
    for drop in forms:
        cache = make_cache("cuda", layout, "fp16")
        cache.compress(keys.cuda(), values.cuda())
        cache.append(new_keys[:, :, :DRAFTS].cuda(), new_values[:, :, :DRAFTS].cuda())
        cache.truncate(drop)
        results.append(inspect(cache))
    assert list(results[0]["lengths"]) == [KEEP + DRAFTS - 2] * (BATCH * KV_HEADS)
    for other in results[1:]:
        same_state(results[0], other)
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.truncate: argument 'drop': expected int32 elements.*got int64 \[2\] on cuda"):
        cache.truncate(torch.tensor([1, 1], device="cuda"))


def refusals(layout):
    cases = [("negative", [-1, 0]), ("past a head's length", [0, KEEP + DRAFTS + 1]),
             ("past KIVI's fp16 group", [0, 30])]  # KEEP + 4 = 44 tokens: a sealed group of 32, 12 in the residual one
    return cases if layout != "contiguous" else [("negative", -1), ("past the length", KEEP + DRAFTS + 1), ("unequal", [1, 2])]


@pytest.mark.parametrize("layout,check", [("contiguous", "sync"), ("flat", "sync"), ("flat", "deferred"),
                                          ("paged", "sync"), ("paged", "deferred")])
def test_refused_truncations_on_cuda_raise_the_cpus_error_and_change_nothing(layout, check):
    codec = "fp16" if layout == "contiguous" else "int8"
    keys, values, new_keys, new_values, queries = make_inputs(23, DTYPES[codec])
    caches = {}
    for device in ("cpu", "cuda"):
        cache = caches[device] = make_cache(device, layout, codec, check=check)
        cache.compress(on(device, keys), on(device, values))
        cache.append(on(device, new_keys[:, :, :DRAFTS]), on(device, new_values[:, :, :DRAFTS]))
    gpu = caches["cuda"]
    before, out = inspect(gpu), host(gpu.attend(queries[:, :, 0].contiguous().cuda()))
    for name, drop in refusals(layout):
        with pytest.raises(kvtrim.Error) as on_cpu:
            caches["cpu"].truncate(drop)
        if check == "deferred" and layout != "contiguous":
            gpu.truncate(drop)  # recorded on the device, raised at the next check
            with pytest.raises(kvtrim.Error) as on_gpu:
                gpu.check_status()
        else:
            with pytest.raises(kvtrim.Error) as on_gpu:
                gpu.truncate(drop)
        assert str(on_gpu.value) == str(on_cpu.value), name
        same_state(before, inspect(gpu))
        assert np.array_equal(host(gpu.attend(queries[:, :, 0].contiguous().cuda())), out), name
    gpu.truncate(1)
    assert list(gpu.head_lengths()) == [KEEP + DRAFTS - 1] * (BATCH * KV_HEADS)


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4", "fp8"])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_multi_query_attend_on_cuda_equals_the_cpu(layout, codec, rows):
    if layout == "contiguous" and codec in QUANTIZING:
        pytest.skip("contiguous CUDA caches compile fp16/bf16/fp32 only (registry_cuda.cuh)")
    keys, values, new_keys, new_values, queries = make_inputs(24 + rows, DTYPES[codec], rows=8)
    queries = queries[:, :, :rows].contiguous()
    outs = {}
    for device in ("cpu", "cuda"):
        cache = make_cache(device, layout, codec)
        cache.compress(on(device, keys), on(device, values))
        cache.append(on(device, new_keys[:, :, :rows]), on(device, new_values[:, :, :rows]))
        outs[device] = cache.attend(on(device, queries))
        if device == "cpu":
            rows_held = inspect(cache)["rows"]
    gpu = host(outs["cuda"])
    assert gpu.shape == (BATCH, Q_HEADS, rows, DIM)
    assert_attend_close(codec, host(outs["cpu"]), gpu, queries, rows_held)
    # And against the float64 causal oracle over the rows the device holds (read back): its bound plus the
    # device's own roundings (decode_bound's storage-type terms).
    want, bound = causal_oracle(cache, queries.float().numpy())
    held = max(len(k) for k, _ in rows_held)
    for i in range(rows):
        error = np.abs(gpu[:, :, i] - want[:, :, i])
        assert np.all(error <= bound[:, :, i] + decode_bound(codec, queries[:, :, i], rows_held, held)), f"row {i}"
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.attend: argument 'queries'.*with L = 1 to 8"):
        cache.attend(torch.zeros(BATCH, Q_HEADS, 9, DIM, dtype=DTYPES[codec], device="cuda"))


# ---- LowRank(source="profile") --------------------------------------------------------------------------


def profile_bases(seed, rank=RANK):
    rng = np.random.default_rng(seed)
    return tuple(np.stack([np.linalg.qr(rng.standard_normal((DIM, rank)))[0] for _ in range(KV_HEADS)]).astype(np.float32)
                 for _ in range(2))


PRESSES = [("static_window", "uniform"), ("snapkv", "uniform"), ("snapkv", "adaptive"), ("retrieval_head", "by_scorer")]


def low_rank_attention_bound(queries, stored, kv_heads, compensated=()):
    """|gpu − cpu| per (b, j) for decode attention over low-rank storage, both in fp32.

    The CPU scores (Uᵀq)·c and the GPU (Uᵀq·log2e/√D)·c in other orders: each logit is within
    (D + r + 5)·u·S of the exact one, S = max_i Σ_j |c_ij|·Σ_d |U_dj q_d| / √D; the softmax and the
    mix of value coefficients over n tokens add (2n + 1)·u, the lift by U_v r + 1 more, relative to
    V = max_i Σ_j |U^v_dj c^v_ij| (the largest rebuilt value). Each side is within
    (e^(2δ + 4u) − 1)·V + (2n + r + 2)·u·V of the exact result: twice that between them.
    Heads in `compensated` (RazorAttention's compensation row, whose coefficients may differ by one
    fp16 ulp, 2^-10 relative, between the backends) add that row's own difference: its logit moves by
    at most 2^-10·S and its rebuilt value by 2^-10·V, so (e^(2·2^-10·S) − 1)·V + 2^-10·V more."""
    batch, q_heads, dim = queries.shape
    group = q_heads // kv_heads
    bound = np.empty((batch, q_heads, 1))
    for b in range(batch):
        for j in range(q_heads):
            head = stored[b * kv_heads + j // group]
            u_k, c_k = head["key_basis"].astype(np.float64), head["key_coefficients"].astype(np.float64)
            u_v, c_v = head["value_basis"].astype(np.float64), head["value_coefficients"].astype(np.float64)
            projected = np.abs(u_k * queries[b, j].astype(np.float64)[:, None]).sum(axis=0)  # Σ_d |U_dj q_d| [r]
            largest_logit = (np.abs(c_k) @ projected).max() / np.sqrt(dim)
            largest_value = (np.abs(c_v) @ np.abs(u_v).T).max()
            n, r = len(c_k), u_k.shape[1]
            delta = (dim + r + 5) * U32 * largest_logit
            bound[b, j, 0] = 2 * (np.expm1(2 * delta + 4 * U32) + (2 * n + r + 2) * U32) * largest_value
            if b * kv_heads + j // group in compensated:
                bound[b, j, 0] += (np.expm1(2 * 2.0 ** -10 * largest_logit) + 2.0 ** -10) * largest_value
    return bound


def structured_rows(rng, basis, count, new_direction):
    """count rows x = Σ_j a_j σ_j u_j + 10⁻³·noise over a head's 5 orthonormal directions u_j (basis[:, :5]),
    σ = (10, 8, 6, 4, 0.2), a_j standard normal: energy 100 : 64 : 36 : 16 : 0.04, so the 0.98 energy
    rule picks rank 4 with wide margins (3 directions hold 0.926 of it, 4 hold 0.9998; a sample of ~100
    rows moves each share by ~10 %, far from either boundary), and the gaps between σ² (36 vs 16, 16 vs
    0.04) fix the top-3 and top-4 subspaces far above any rounding. new_direction: plus σ = 8 along
    basis[:, 5], orthogonal to the five (a basis refresh must add it)."""
    sigma = np.array([10.0, 8.0, 6.0, 4.0, 0.2] + ([8.0] if new_direction else []))
    coefficients = rng.standard_normal((count, len(sigma))) * sigma
    return coefficients @ basis[:, :len(sigma)].T + 1e-3 * rng.standard_normal((count, DIM))


def projector_distance(a, b):
    """max |A Aᵀ − B Bᵀ| over entries, for orthonormal columns: 0 for the same subspace whatever the signs."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.abs(a @ a.T - b @ b.T).max()


# fixed3: rank 3 makes the stored rank 3, so every refresh returns at once (extend: rank ≥ stored rank);
# that case checks the fixed-rank compaction and the appends' projection, not the Jacobi refresh.
@pytest.mark.parametrize("rank", [None, 3], ids=["energy", "fixed3"])
def test_sequence_low_rank_on_cuda_fits_the_cpus_bases(rank):
    """LowRank(source="sequence") on CUDA: the device fits every head's bases at compress (Gram matrices,
    cuSOLVER) and grows them every 16 appended tokens (a Jacobi refresh per head), the CPU with Eigen's SVD.

    Same data on both backends (structured_rows: well-separated spectra); compared after the compress and
    after appends of 1, 17 (a refresh inside the call) and 2 tokens, where half the heads gain a new strong
    direction (energy: rank 4 → 5 at the refresh; fixed rank 3: stays 3):
      - ranks identical, and as designed;
      - subspaces: projector_distance ≤ 64·r·2⁻²⁴ — each basis entry is a double rounded to float
        (≤ 2⁻²⁴ relative), so each projector entry Σ_j u_dj u_ej moves by ≤ 2r·2⁻²⁴ per side (4r·2⁻²⁴
        between them); the eigen-solvers' own error (Davis–Kahan: ‖ΔG‖/gap, ‖ΔG‖ ~ T·2⁻⁵³·‖G‖, gap ≥
        0.5·‖G‖ here) is ~10⁻¹³; the factor 16 over 4r·2⁻²⁴ is a margin, not derived (the refresh's
        Gram–Schmidt in double, in another order: tests/cuda/codecs_test.cu derives the tight bound);
      - read() rows U c: per element ≤ Σ_j |U_dj|·(2⁻¹⁰|c_j| + 2⁻²⁴) + the projector bound·‖x‖ —
        each coefficient c_j = fp16(u_jᵀx) may round to neighbouring fp16 values on the two sides
        (≤ one ulp, 2⁻¹⁰|c_j|), and the subspaces differ by the bound above, which moves U Uᵀx by
        ≤ bound·√D·‖x‖ (‖x‖: the largest input row's norm, a bound for every stored row);
      - decode attention: |gpu − cpu| ≤ low_rank_attention_bound over the CPU's storage (fp32 roundings)
        + 2(e^(2δ) − 1)·V + max|Δv|, δ = max_i Σ_d |q_d||Δk_id|/√D from the rows' measured differences.
    """
    rng = np.random.default_rng(17)
    tokens = 120
    bases = {(b, h, kind): np.linalg.qr(rng.standard_normal((DIM, 6)))[0]
             for b in range(BATCH) for h in range(KV_HEADS) for kind in ("k", "v")}
    gains = {(b, h): (b + h) % 2 == 0 for b in range(BATCH) for h in range(KV_HEADS)}

    def rows(count, appended):
        out = np.empty((2, BATCH, KV_HEADS, count, DIM), dtype=np.float32)
        for b in range(BATCH):
            for h in range(KV_HEADS):
                for i, kind in enumerate(("k", "v")):
                    out[i, b, h] = structured_rows(rng, bases[(b, h, kind)], count, appended and gains[(b, h)])
        return torch.from_numpy(out[0]), torch.from_numpy(out[1])

    keys, values = rows(tokens, False)
    appends = [rows(n, True) for n in (1, 17, 2)]
    largest_row = {kind: max(float(np.linalg.norm(x.numpy().astype(np.float64), axis=-1).max())
                             for x in [keys if kind == "key" else values]
                             + [a[0] if kind == "key" else a[1] for a in appends])
                   for kind in ("key", "value")}
    codec = kvtrim.LowRank(rank=rank, max_rank=16)
    caches = {device: kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, compression_ratio=0.2), codec, "flat",
                                   (Q_HEADS, KV_HEADS, DIM), BATCH, BATCH * KV_HEADS * (tokens + 40), device=device)
              for device in ("cpu", "cuda")}

    def compare(step, expected_ranks):
        cpu, gpu = inspect(caches["cpu"]), inspect(caches["cuda"])
        assert np.array_equal(gpu["lengths"], cpu["lengths"]) and gpu["positions"] == cpu["positions"], step
        for b in range(BATCH):
            for h in range(KV_HEADS):
                c, g = caches["cpu"].low_rank(b, h), caches["cuda"].low_rank(b, h)
                head = b * KV_HEADS + h
                for kind, (rows_c, rows_g) in (("key", (cpu["rows"][head][0], gpu["rows"][head][0])),
                                              ("value", (cpu["rows"][head][1], gpu["rows"][head][1]))):
                    u_c, u_g = c[f"{kind}_basis"], g[f"{kind}_basis"]
                    r = u_c.shape[1]
                    assert u_g.shape == u_c.shape, f"{step}: head {head} {kind} rank cuda {u_g.shape[1]}, cpu {r}"
                    assert r == expected_ranks(b, h), f"{step}: head {head} {kind} rank {r} (the data's design)"
                    subspace = 64 * r * U32
                    assert projector_distance(u_c, u_g) <= subspace, f"{step}: head {head} {kind}"
                    coefficients = np.maximum(np.abs(c[f"{kind}_coefficients"]), np.abs(g[f"{kind}_coefficients"]))
                    bound = ((coefficients * 2.0 ** -10 + U32) @ np.abs(u_c).T.astype(np.float64)
                             + subspace * np.sqrt(DIM) * largest_row[kind])
                    error = np.abs(rows_g.astype(np.float64) - rows_c.astype(np.float64))
                    assert np.all(error <= bound), f"{step}: head {head} {kind} rows, worst {(error / bound).max():.3f}"

    grown = rank is None
    for device, cache in caches.items():
        cache.compress(on(device, keys), on(device, values))
    compare("compress", lambda b, h: 3 if rank == 3 else 4)
    for n, (new_keys, new_values) in zip((1, 17, 2), appends):
        for device, cache in caches.items():
            cache.append(on(device, new_keys), on(device, new_values))
        after_refresh = n != 1
        compare(f"append {n}", lambda b, h: 3 if rank == 3 else (5 if after_refresh and grown and gains[(b, h)] else 4))

    queries = torch.from_numpy(rng.standard_normal((BATCH, Q_HEADS, DIM)).astype(np.float32))
    outs = {device: host(cache.attend(on(device, queries))) for device, cache in caches.items()}
    stored = [caches["cpu"].low_rank(b, h) for b in range(BATCH) for h in range(KV_HEADS)]
    cpu, gpu = inspect(caches["cpu"]), inspect(caches["cuda"])
    q = queries.numpy().astype(np.float64)
    bound = low_rank_attention_bound(queries.numpy(), stored, KV_HEADS)
    group = Q_HEADS // KV_HEADS
    for b in range(BATCH):
        for j in range(Q_HEADS):
            head = b * KV_HEADS + j // group
            (ck, cv), (gk, gv) = cpu["rows"][head], gpu["rows"][head]
            delta = (np.abs(gk.astype(np.float64) - ck) @ np.abs(q[b, j])).max() / np.sqrt(DIM)
            largest_value = np.abs(cv).max()
            bound[b, j, 0] += 2 * np.expm1(2 * delta) * largest_value + np.abs(gv.astype(np.float64) - cv).max()
    error = np.abs(outs["cuda"] - outs["cpu"])
    assert np.all(error <= bound), f"worst {(error / bound).max():.3f} of the bound"


def test_sequence_low_rank_on_cuda_refuses_refreshes_past_32_tokens():
    cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=4, compression_ratio=0.2), kvtrim.LowRank(max_rank=16, update_freq=33),
                         "flat", (Q_HEADS, KV_HEADS, DIM), BATCH, BATCH * KV_HEADS * 64, device="cuda")
    keys, values = (torch.randn(BATCH, KV_HEADS, 40, DIM, device="cuda") for _ in range(2))
    # The cache was never compressed (every compress of this config is refused), so its whole state is
    # its head lengths (all 0) and positions: inspect() would also ask for a kept set it cannot have.
    before = (cache.head_lengths().copy(), cache.positions().copy())
    with pytest.raises(kvtrim.Error, match=r"argument 'config.codec.update_freq': expected at most 32 appended tokens "
                                           r"between refreshes of sequence bases on backend::cuda.*got 33"):
        cache.compress(keys, values)
    lengths, positions = cache.head_lengths(), cache.positions()
    assert np.array_equal(lengths, before[0]) and not lengths.any()
    assert np.array_equal(positions, before[1])


@pytest.mark.parametrize("scorer,budget", PRESSES, ids=lambda x: str(x))
def test_profile_low_rank_on_cuda_equals_the_cpu(scorer, budget):
    keys, values, new_keys, new_values, queries = make_inputs(31, torch.float32)
    window = queries[:, :, :1].expand(BATCH, Q_HEADS, 16, DIM).contiguous() + torch.linspace(0, 1, 16)[None, None, :, None]
    key_bases, value_bases = profile_bases(32)
    caches, snapshots, outs = {}, {}, {}
    for device in ("cpu", "cuda"):
        cache = caches[device] = kvtrim.Cache(make_press(scorer, budget), kvtrim.LowRank(rank=RANK, source="profile"),
                                              "flat", (Q_HEADS, KV_HEADS, DIM), BATCH,
                                              BATCH * KV_HEADS * (TOKENS + 8), device=device, layer=LAYER, layers=LAYERS)
        cache.set_basis(key_bases, value_bases)
        cache.compress(on(device, keys), on(device, values), on(device, window))
        snapshots[device] = inspect(cache)
        cache.append(on(device, new_keys[:, :, :2]), on(device, new_values[:, :, :2]))
        outs[device] = cache.attend(on(device, queries[:, :, 0].contiguous()))
    if not compare_kept(scorer, budget, snapshots["cpu"], snapshots["cuda"], keys):
        pytest.skip("kept sets differ at near-ties (test_cuda.py's rule); the caches differ by design")
    cpu, gpu = inspect(caches["cpu"]), inspect(caches["cuda"])
    assert np.array_equal(gpu["lengths"], cpu["lengths"]) and gpu["positions"] == cpu["positions"]
    stored = {}
    for device, cache in caches.items():
        stored[device] = [cache.low_rank(b, h) for b in range(BATCH) for h in range(KV_HEADS)]
    compensated = scorer == "retrieval_head"
    for head, (c, g) in enumerate(zip(stored["cpu"], stored["cuda"])):
        for part in ("key_basis", "value_basis"):
            assert np.array_equal(g[part], c[part]), f"head {head} {part}"
        for part in ("key_coefficients", "value_coefficients"):
            if compensated and not RETRIEVAL[LAYER][head % KV_HEADS]:  # the compensation row (after the 4 sinks): one fp16 ulp
                one_ulp = np.abs(c[part][4]) * 2.0 ** -10 + 2.0 ** -24
                assert np.all(np.abs(g[part][4] - c[part][4]) <= one_ulp), f"head {head} {part}"
                assert np.array_equal(np.delete(g[part], 4, axis=0), np.delete(c[part], 4, axis=0)), f"head {head} {part}"
            else:
                assert np.array_equal(g[part], c[part]), f"head {head} {part}"
                (ck, cv), (gk, gv) = cpu["rows"][head], gpu["rows"][head]
                assert np.array_equal(gk, ck) and np.array_equal(gv, cv), f"head {head} rows"
    for field in ("codec", "bytes_per_token", "bytes_per_head", "kept", "bytes", "total_bytes", "ratio", "table"):
        assert gpu["stats"][field] == cpu["stats"][field], field
    q = queries[:, :, 0].numpy()
    error = np.abs(host(outs["cuda"]) - host(outs["cpu"]))
    with_compensation = [head for head in range(BATCH * KV_HEADS) if compensated and not RETRIEVAL[LAYER][head % KV_HEADS]]
    assert np.all(error <= low_rank_attention_bound(q, stored["cpu"], KV_HEADS, with_compensation)), f"worst {error.max():.3e}"
    # Rolling back drafts: what the device does with low-rank storage (rollback.cuh; refused before any write).
    before = inspect(caches["cuda"])
    try:
        caches["cuda"].truncate(1)
    except kvtrim.Error as error:
        assert "expected a scheme whose codec rolls back on its device" in str(error)
        same_state(before, inspect(caches["cuda"]))
    else:  # once the device rolls low-rank storage back: the CPU's lengths and positions
        caches["cpu"].truncate(1)
        cpu, gpu = inspect(caches["cpu"]), inspect(caches["cuda"])
        assert np.array_equal(gpu["lengths"], cpu["lengths"]) and gpu["positions"] == cpu["positions"]


def test_profile_low_rank_on_cuda_refusals():
    key_bases, value_bases = profile_bases(33)
    cache = kvtrim.Cache(kvtrim.StreamingLLM(compression_ratio=0.5), kvtrim.LowRank(rank=RANK, source="profile"), "flat",
                         (Q_HEADS, KV_HEADS, DIM), BATCH, 4096, device="cuda")
    keys = torch.randn(BATCH, KV_HEADS, TOKENS, DIM, device="cuda")
    twin = kvtrim.Cache(kvtrim.StreamingLLM(compression_ratio=0.5), kvtrim.LowRank(rank=RANK, source="profile"), "flat",
                        (Q_HEADS, KV_HEADS, DIM), BATCH, 4096)
    with pytest.raises(kvtrim.Error) as on_cpu:
        twin.compress(keys.cpu(), keys.cpu())
    with pytest.raises(kvtrim.Error) as on_gpu:
        cache.compress(keys, keys)  # no bases installed yet: the CPU's refusal, word for word
    assert str(on_gpu.value) == str(on_cpu.value)
    assert "a basis for every head" in str(on_gpu.value)
    bad = key_bases.copy()
    bad[1, :, 0] *= 2.0
    with pytest.raises(kvtrim.Error, match=r"kvtrim.Cache.set_basis: argument 'key_bases': expected orthonormal columns"):
        cache.set_basis(bad, value_bases)
    cache.set_basis(torch.from_numpy(key_bases).cuda(), value_bases)  # a device tensor is copied to the host first
    cache.compress(keys, keys)
    assert cache.low_rank(1, 1)["key_basis"].shape == (DIM, RANK)
    assert np.array_equal(cache.low_rank(1, 1)["key_basis"], key_bases[1])
    with pytest.raises(kvtrim.Error, match=r"argument 'queries'|multi-query|several queries"):
        cache.attend(torch.randn(BATCH, Q_HEADS, 2, DIM, device="cuda"))  # low-rank decodes one query per sequence on CUDA
