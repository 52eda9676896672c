"""Cache.compress(..., lengths=): prompts of different lengths in one right-padded batch (CPU and CUDA caches).

The definition is the oracle: sequence b must end up exactly as if its first lengths[b] tokens had
been compressed alone into a one-sequence cache — the same kept tokens, positions, stored rows and
attention output, bit for bit on the CPU (on CUDA, attention within the decode's fp16 bound: see
below). The padding holds NaN, so reading any of it would be refused or would poison the output.
"""

import numpy as np
import pytest

import kvtrim

HQ, H, D = 4, 2, 16
LENGTHS = [45, 12, 70]
T = max(LENGTHS)


def padded(rng, rows):
    x = rng.standard_normal((len(LENGTHS), rows, T, D), dtype=np.float32)
    for b, n in enumerate(LENGTHS):
        x[b, :, n:] = np.nan
    return x


def make(press, codec, layout, batch):
    # capacity: slots per head (contiguous) or in the whole pool (flat, paged: room for KIVI's 32-slot runs)
    capacity = 16 if layout == "contiguous" else batch * H * 160
    return kvtrim.Cache(press, codec, layout=layout, shape=(HQ, H, D), batch=batch, capacity=capacity)


CASES = [
    ("SnapKV+AdaKV paged", lambda: kvtrim.AdaKV(kvtrim.SnapKV(window=4, compression_ratio=0.6)), kvtrim.FP16(), "paged"),
    ("SnapKV flat KIVI", lambda: kvtrim.SnapKV(window=4, compression_ratio=0.5), kvtrim.KIVI(bits=8), "flat"),
    ("H2O paged", lambda: kvtrim.H2O(compression_ratio=0.5), kvtrim.FP16(), "paged"),
    ("StreamingLLM contiguous", lambda: kvtrim.StreamingLLM(sinks=2, tokens=10), kvtrim.FP16(), "contiguous"),
    ("KeyNorm+Pyramid flat", lambda: kvtrim.Pyramid(kvtrim.KeyNorm(compression_ratio=0.5)), kvtrim.FP32(), "flat"),
]


@pytest.mark.parametrize("name,press,codec,layout", CASES, ids=[c[0] for c in CASES])
def test_each_sequence_as_if_compressed_alone(rng, name, press, codec, layout):
    keys, values = padded(rng, H), padded(rng, H)
    needs_every_query = name.startswith("H2O")
    if needs_every_query:
        window_queries = padded(rng, HQ)
    else:
        window_queries = rng.standard_normal((len(LENGTHS), HQ, 4, D), dtype=np.float32)
    queries = rng.standard_normal((len(LENGTHS), HQ, D), dtype=np.float32)

    together = make(press(), codec, layout, len(LENGTHS))
    together.compress(keys, values, window_queries, lengths=np.array(LENGTHS))
    out = together.attend(queries)
    offsets, kept = together.kept()
    lengths_held = together.head_lengths()
    assert np.isfinite(out).all(), "a padded token was read"

    alone_positions, appended = {}, {}
    for b, n in enumerate(LENGTHS):
        alone = make(press(), codec, layout, 1)
        own_queries = window_queries[b:b + 1, :, :n] if needs_every_query else window_queries[b:b + 1]
        alone.compress(np.ascontiguousarray(keys[b:b + 1, :, :n]), np.ascontiguousarray(values[b:b + 1, :, :n]),
                       np.ascontiguousarray(own_queries))
        alone_out = alone.attend(queries[b:b + 1])
        alone_offsets, alone_kept = alone.kept()
        for h in range(H):
            head = b * H + h
            assert lengths_held[head] == alone.head_lengths()[h]
            assert kept[offsets[head]:offsets[head + 1]].tolist() == \
                alone_kept[alone_offsets[h]:alone_offsets[h + 1]].tolist(), f"sequence {b}, head {h}"
            for got, want in zip(together.read(b, h), alone.read(0, h)):
                assert np.array_equal(got, want)
        assert np.array_equal(out[b], alone_out[0]), f"sequence {b}: attention differs from compressing it alone"
        # Two decode steps appended: positions continue from each prompt's own end.
        new = rng.standard_normal((1, H, 2, D), dtype=np.float32)
        alone.append(new, new)
        alone_positions[b] = (alone.positions(), alone.head_lengths().copy(), alone.attend(queries[b:b + 1])[0])
        appended[b] = new
    batch_new = np.concatenate([appended[b] for b in range(len(LENGTHS))])
    together.append(batch_new, batch_new)
    out = together.attend(queries)
    positions, held = together.positions(), together.head_lengths()
    starts = np.concatenate([[0], np.cumsum(held)])
    for b in range(len(LENGTHS)):
        alone_pos, alone_held, alone_out = alone_positions[b]
        alone_starts = np.concatenate([[0], np.cumsum(alone_held)])
        for h in range(H):
            head = b * H + h
            assert positions[starts[head]:starts[head + 1]].tolist() == \
                alone_pos[alone_starts[h]:alone_starts[h + 1]].tolist(), f"sequence {b}, head {h} after appends"
        assert np.array_equal(out[b], alone_out), f"sequence {b}: attention after appends"


def test_lengths_are_checked_and_a_refusal_leaves_the_cache(rng):
    keys, values = padded(rng, H), padded(rng, H)
    window_queries = rng.standard_normal((len(LENGTHS), HQ, 4, D), dtype=np.float32)
    cache = make(kvtrim.SnapKV(window=4, compression_ratio=0.5), kvtrim.FP16(), "paged", len(LENGTHS))
    cache.compress(keys, values, window_queries, lengths=LENGTHS)
    before = (cache.head_lengths().copy(), cache.positions().copy(), [cache.read(b, h) for b in range(3) for h in range(H)])
    for bad, message in [([45, 12], "argument 'lengths': expected 3 prompt lengths"),
                         ([45, 0, 70], "argument 'options.sequence_lengths'.*0 for sequence 1"),
                         ([45, 12, 71], "argument 'options.sequence_lengths'.*71 for sequence 2"),
                         ([45, 3, 70], "argument 'options.sequence_lengths'.*window queries"),
                         ([45, 12.5, 70], "argument 'lengths': expected one integer prompt length"),
                         ([45, True, 70], "argument 'lengths': expected one integer prompt length"),
                         (np.array([[45, 12, 70]]), "argument 'lengths': expected one integer prompt length"),
                         ([45, 2**63, 70], "argument 'lengths': expected one integer prompt length")]:
        with pytest.raises(kvtrim.Error, match=message):
            cache.compress(keys, values, window_queries, lengths=bad)
        assert np.array_equal(cache.head_lengths(), before[0])
        assert np.array_equal(cache.positions(), before[1])
        for (got_k, got_v), (want_k, want_v) in zip([cache.read(b, h) for b in range(3) for h in range(H)], before[2]):
            assert np.array_equal(got_k, want_k) and np.array_equal(got_v, want_v)


def test_without_lengths_the_padding_is_refused(rng):
    # The same batch without lengths reads every token: the NaN padding is refused by name.
    keys, values = padded(rng, H), padded(rng, H)
    window_queries = rng.standard_normal((len(LENGTHS), HQ, 4, D), dtype=np.float32)
    cache = make(kvtrim.SnapKV(window=4, compression_ratio=0.5), kvtrim.FP16(), "paged", len(LENGTHS))
    with pytest.raises(kvtrim.Error, match="keys.*finite values"):
        cache.compress(keys, values, window_queries)


def test_eviction_seed_reads_each_prompt(rng):
    # The metric seeded from a padded batch holds exactly the values each sequence's own seed holds
    # (slots differ between the caches; the multiset of non-zero values does not).
    keys, values = padded(rng, H), padded(rng, H)
    window_queries = rng.standard_normal((len(LENGTHS), HQ, 4, D), dtype=np.float32)
    press = lambda: kvtrim.SnapKV(window=4, compression_ratio=0.5)
    together = make(press(), kvtrim.FP16(), "paged", len(LENGTHS))
    together.compress(keys, values, window_queries, lengths=LENGTHS)
    eviction = kvtrim.Eviction([together], keep=40, protected_window=2)
    eviction.seed(0, keys, window_queries)
    got = eviction.metrics[0]
    assert np.isfinite(got).all()
    want = []
    for b, n in enumerate(LENGTHS):
        alone = make(press(), kvtrim.FP16(), "paged", 1)
        alone.compress(np.ascontiguousarray(keys[b:b + 1, :, :n]), np.ascontiguousarray(values[b:b + 1, :, :n]),
                       window_queries[b:b + 1])
        own = kvtrim.Eviction([alone], keep=40, protected_window=2)
        own.seed(0, np.ascontiguousarray(keys[b:b + 1, :, :n]), window_queries[b:b + 1])
        want.append(own.metrics[0][own.metrics[0] != 0])
    assert np.array_equal(np.sort(got[got != 0]), np.sort(np.concatenate(want)))


# --- CUDA caches (skipped without torch, a GPU or a CUDA build) ----------------------------------
# The same oracle on the device: the batch with lengths against each sequence compressed alone on the
# device. The same kernels run on the same slices (the scorer and budget of a padded batch are launched
# per sequence over views of its first lengths[b] tokens), so kept tokens and lengths are equal;
# attention within the decode's fp16 bound (below). HD = 64: the device kernels' head dims.
CUDA_CASES = [
    ("SnapKV+AdaKV paged", lambda: kvtrim.AdaKV(kvtrim.SnapKV(window=4, compression_ratio=0.6)), "paged"),
    ("H2O flat", lambda: kvtrim.H2O(compression_ratio=0.5), "flat"),
    ("StreamingLLM contiguous", lambda: kvtrim.StreamingLLM(sinks=2, tokens=10), "contiguous"),
]


def cuda_or_skip():
    torch = pytest.importorskip("torch")
    if not (torch.cuda.is_available() and kvtrim.has_cuda):
        pytest.skip("needs a GPU and kvtrim built with CUDA")
    return torch


@pytest.mark.parametrize("name,press,layout", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_each_sequence_as_if_compressed_alone(rng, name, press, layout):
    torch = cuda_or_skip()
    hd = 64
    keys = torch.randn(len(LENGTHS), H, T, hd, dtype=torch.float16, device="cuda")
    values = torch.randn_like(keys)
    for b, n in enumerate(LENGTHS):
        keys[b, :, n:] = float("nan")
        values[b, :, n:] = float("nan")
    every_query = name.startswith("H2O")
    window_queries = torch.randn(len(LENGTHS), HQ, T if every_query else 4, hd, dtype=torch.float16, device="cuda")
    if every_query:
        for b, n in enumerate(LENGTHS):
            window_queries[b, :, n:] = float("nan")
    queries = torch.randn(len(LENGTHS), HQ, hd, dtype=torch.float16, device="cuda")

    def cache(batch):
        capacity = 16 if layout == "contiguous" else batch * H * 160
        return kvtrim.Cache(press(), kvtrim.FP16(), layout=layout, shape=(HQ, H, hd), batch=batch,
                            capacity=capacity, device="cuda")

    together = cache(len(LENGTHS))
    together.compress(keys, values, window_queries, lengths=LENGTHS)
    out = together.attend(queries).cpu()
    offsets, kept = together.kept()
    held = together.head_lengths()
    assert torch.isfinite(out.float()).all(), "a padded token was read"
    for b, n in enumerate(LENGTHS):
        alone = cache(1)
        own = window_queries[b:b + 1, :, :n] if every_query else window_queries[b:b + 1]
        alone.compress(keys[b:b + 1, :, :n].contiguous(), values[b:b + 1, :, :n].contiguous(), own.contiguous())
        alone_offsets, alone_kept = alone.kept()
        for h in range(H):
            head = b * H + h
            assert held[head] == alone.head_lengths()[h]
            assert kept[offsets[head]:offsets[head + 1]].tolist() == \
                alone_kept[alone_offsets[h]:alone_offsets[h + 1]].tolist(), f"sequence {b}, head {h}"
        # Decode splits a batch cache's heads at other points than a one-sequence cache's (fp32 sums in
        # another order, each output then rounded to fp16): within combinations_test's fp16 bound,
        # 2^-9·max|v| ≈ 2e-3·max|v| (a padded token read or a row misplaced moves it by O(max|v| / kept)).
        bound = 2.0 ** -9 * values[b, :, :n].float().abs().max().item()
        difference = (out[b].float() - alone.attend(queries[b:b + 1]).cpu()[0].float()).abs().max().item()
        assert difference <= bound, f"sequence {b}: attention differs by {difference} > {bound}"


def test_cuda_eviction_seed_after_lengths_equals_the_cpu_seed(rng):
    # A CUDA cache compressed with lengths seeds (from the host lengths its compress took) the metric a
    # CPU cache compressed with the same lengths seeds: each sequence from the window at the end of its
    # own prompt, the NaN padding never read. StreamingLLM keeps the same tokens on both backends (static
    # windows: the identical CSR, checked first) and both paged caches hand out the same pages (as in
    # test_cuda's eviction twin), so the metrics compare slot by slot, within test_cuda's seed bound
    # (metric_relative_bound, from eviction_test.cu's derivation): each probability's exponent off by
    # eps <= 4(D + 5)u*S + (T + 136)u with S <= max|q|*max|k|/sqrt(D) (Cauchy-Schwarz, prompts only) and
    # T = max T_b (the bound grows with T_b), p^2 by expm1(4 eps), the G*w-term sum by 2(G*w + 2)u more.
    torch = cuda_or_skip()
    hd, window = 64, 4
    half = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    keys, values, window_queries = half(len(LENGTHS), H, T, hd), half(len(LENGTHS), H, T, hd), \
        half(len(LENGTHS), HQ, window, hd)
    for b, n in enumerate(LENGTHS):
        keys[b, :, n:] = np.nan
        values[b, :, n:] = np.nan
    seeded = {}
    for device in ("cpu", "cuda"):
        cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=2, tokens=10), kvtrim.FP16(), layout="paged",
                             shape=(HQ, H, hd), batch=len(LENGTHS), capacity=len(LENGTHS) * H * 160, device=device)
        eviction = kvtrim.Eviction([cache], keep=40, protected_window=2)
        if device == "cpu":
            cache.compress(keys.astype(np.float32), values.astype(np.float32), lengths=LENGTHS)
            eviction.seed(0, keys.astype(np.float32), window_queries.astype(np.float32))
            metric = eviction.metrics[0]
        else:
            cache.compress(torch.from_numpy(keys).cuda(), torch.from_numpy(values).cuda(), lengths=LENGTHS)
            eviction.seed(0, torch.from_numpy(keys).cuda(), torch.from_numpy(window_queries).cuda())
            metric = eviction.metrics[0].cpu().numpy()
        seeded[device] = (cache.kept(), cache.head_lengths(), metric.astype(np.float64))
    (cpu_kept, cpu_held, want), (gpu_kept, gpu_held, have) = seeded["cpu"], seeded["cuda"]
    assert [k.tolist() for k in gpu_kept] == [k.tolist() for k in cpu_kept]
    assert gpu_held.tolist() == cpu_held.tolist()
    assert np.isfinite(have).all(), "a padded key was read"
    assert np.count_nonzero(want) > 0 and np.array_equal(have != 0, want != 0)

    u, group = 2.0 ** -24, HQ // H
    prompt_keys = [keys[b, :, :n].astype(np.float64) for b, n in enumerate(LENGTHS)]
    largest = (np.linalg.norm(window_queries.astype(np.float64), axis=-1).max() *
               max(np.linalg.norm(k, axis=-1).max() for k in prompt_keys) / np.sqrt(hd))
    relative = np.expm1(4 * (4 * (hd + 5) * u * largest + (T + 136) * u)) + 2 * (group * window + 2) * u
    assert np.all(np.abs(have - want) <= relative * np.abs(want) + 1e-38)


def test_cuda_eviction_seed_after_a_compress_without_lengths_reads_every_sequence_whole(rng):
    # The seed takes the lengths of the cache's *last* compress: after a padded compress, a compress of
    # whole prompts (no lengths) must clear them, or the CUDA seed would read each window at the old
    # T_b. Both backends run the same two compresses and seed from the second's keys: the metrics
    # compare slot by slot within the seed bound of the test above (T the whole prompt).
    torch = cuda_or_skip()
    hd, window = 64, 4
    half = lambda *shape: rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    padded_keys, padded_values = half(len(LENGTHS), H, T, hd), half(len(LENGTHS), H, T, hd)
    for b, n in enumerate(LENGTHS):
        padded_keys[b, :, n:] = np.nan
        padded_values[b, :, n:] = np.nan
    keys, values, window_queries = half(len(LENGTHS), H, T, hd), half(len(LENGTHS), H, T, hd), \
        half(len(LENGTHS), HQ, window, hd)
    seeded = {}
    for device in ("cpu", "cuda"):
        cache = kvtrim.Cache(kvtrim.StreamingLLM(sinks=2, tokens=10), kvtrim.FP16(), layout="paged",
                             shape=(HQ, H, hd), batch=len(LENGTHS), capacity=len(LENGTHS) * H * 160, device=device)
        eviction = kvtrim.Eviction([cache], keep=40, protected_window=2)
        as_input = (lambda a: a.astype(np.float32)) if device == "cpu" else (lambda a: torch.from_numpy(a).cuda())
        cache.compress(as_input(padded_keys), as_input(padded_values), lengths=LENGTHS)
        cache.compress(as_input(keys), as_input(values))
        eviction.seed(0, as_input(keys), as_input(window_queries))
        metric = eviction.metrics[0] if device == "cpu" else eviction.metrics[0].cpu().numpy()
        seeded[device] = (cache.kept(), metric.astype(np.float64))
    (cpu_kept, want), (gpu_kept, have) = seeded["cpu"], seeded["cuda"]
    assert [k.tolist() for k in gpu_kept] == [k.tolist() for k in cpu_kept]
    assert np.isfinite(have).all() and np.count_nonzero(want) > 0
    assert np.array_equal(have != 0, want != 0)
    u, group = 2.0 ** -24, HQ // H
    largest = (np.linalg.norm(window_queries.astype(np.float64), axis=-1).max() *
               np.linalg.norm(keys.astype(np.float64), axis=-1).max() / np.sqrt(hd))
    relative = np.expm1(4 * (4 * (hd + 5) * u * largest + (T + 136) * u)) + 2 * (group * window + 2) * u
    assert np.all(np.abs(have - want) <= relative * np.abs(want) + 1e-38)
