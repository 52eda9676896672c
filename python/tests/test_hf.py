"""Hugging Face generate through kvtrim.hf (skipped without torch and transformers: CI has neither)."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("kvtrim.hf")  # ImportError on a transformers without the layered Cache API

import kvtrim  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(dtype=torch.float32, device="cpu", head_dim=None):
    # The GPU test asks for head_dim 64 (kvtrim's CUDA decode: 64, 128 or 256); the CPU ones use 64 / 4 = 16.
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         **({"head_dim": head_dim} if head_dim else {}))
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()


def greedy(model, ids, cache, new=12):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def prompt(model, tokens=80, device="cpu"):
    return torch.randint(1, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3)).to(device)


def test_keeping_every_token_generates_what_dynamic_cache_does():
    model = tiny_llama()
    ids = prompt(model)
    reference = greedy(model, ids, DynamicCache())
    hf.enable(model)
    cache = hf.KvtrimCache(model.config, kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.FP32(), "contiguous",
                           max_new_tokens=12)
    assert greedy(model, ids, cache) == reference
    assert cache.get_seq_length() == 80 + 11  # positions, not held tokens (the last token is never fed back)


@pytest.mark.parametrize("layout", ["flat", "paged"])
def test_adakv_compresses_for_real_on_ragged_layouts(layout):
    model = tiny_llama()
    ids = prompt(model)
    hf.enable(model)
    press = kvtrim.AdaKV(kvtrim.SnapKV(window=8, compression_ratio=0.5))
    cache = hf.KvtrimCache(model.config, press, kvtrim.FP16(), layout, max_new_tokens=12)
    tokens = greedy(model, ids, cache)
    assert len(tokens) == 12
    for layer in cache.kvtrim_caches():
        lengths = layer.head_lengths()
        assert lengths.sum() == 2 * 40 + 2 * 11  # H·k after compress, then one token per head per step
    assert all(layer.pending is None and layer.keys.numel() == 0 for layer in cache.layers)


@pytest.mark.skipif(not (torch.cuda.is_available() and kvtrim.has_cuda), reason="needs a GPU and kvtrim built with CUDA")
def test_streaming_llm_on_the_gpu():
    model = tiny_llama(torch.float16, "cuda", head_dim=64)
    ids = prompt(model, device="cuda")
    hf.enable(model)
    cache = hf.KvtrimCache(model.config, kvtrim.StreamingLLM(sinks=4, compression_ratio=0.5), kvtrim.FP16(),
                           "contiguous", max_new_tokens=12)
    assert len(greedy(model, ids, cache)) == 12
    assert all((c.head_lengths() == 40 + 11).all() for c in cache.kvtrim_caches())


@pytest.mark.skipif(not (torch.cuda.is_available() and kvtrim.has_cuda), reason="needs a GPU and kvtrim built with CUDA")
@pytest.mark.parametrize("layout", ["flat", "paged"])
def test_adakv_on_the_gpu_in_a_ragged_layout(layout):
    model = tiny_llama(torch.float16, "cuda", head_dim=64)
    ids = prompt(model, device="cuda")
    hf.enable(model)
    press = kvtrim.AdaKV(kvtrim.SnapKV(window=8, compression_ratio=0.5))
    cache = hf.KvtrimCache(model.config, press, kvtrim.FP16(), layout, max_new_tokens=12)
    assert len(greedy(model, ids, cache)) == 12
    for layer in cache.kvtrim_caches():
        assert layer.device == "cuda" and "backend::cuda" in layer.name
        # Read back from the device: H·k after compress (Ada-KV's exact total), then one token per head per step.
        assert layer.head_lengths().sum() == 2 * 40 + 2 * 11
        assert layer.stats()["kept"] == layer.head_lengths().tolist()


# ---- assisted generation: several tokens per step after prefill, and crop ----------------------------------

def repetitive_prompt(model, tokens=80):
    # A phrase of 10 tokens repeated: prompt lookup finds its n-grams and drafts candidates from them.
    phrase = torch.randint(1, model.config.vocab_size, (10,), generator=torch.Generator().manual_seed(5))
    return phrase.repeat(tokens // 10).unsqueeze(0)


class StepRecorder:
    """Counts the tokens of every update after compression and every crop (tokens dropped) of layer 0."""

    def __init__(self, monkeypatch):
        self.steps, self.crops = [], []
        update, crop = hf.KvtrimLayer.update, hf.KvtrimLayer._apply_crop
        recorder = self

        def recording_update(layer, key_states, *args, **kwargs):
            if layer.layer_idx == 0 and layer.kvtrim is not None:
                recorder.steps.append(key_states.shape[-2])
            return update(layer, key_states, *args, **kwargs)

        def recording_crop(layer, drop):
            if layer.layer_idx == 0:
                recorder.crops.append(drop)
            return crop(layer, drop)

        monkeypatch.setattr(hf.KvtrimLayer, "update", recording_update)
        monkeypatch.setattr(hf.KvtrimLayer, "_apply_crop", recording_crop)


def generate(model, ids, cache, new=16, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, **kwargs)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("layout", ["contiguous", "flat", "paged"])
def test_prompt_lookup_verifies_several_tokens_per_step_and_crops_the_rejected(monkeypatch, layout):
    # Keeping every token, assisted greedy generation must give greedy generation's tokens: the
    # candidates are verified by kvtrim's multi-query decode (query row i sees the head up to the
    # i-th new token) and the rejected ones are truncated. The steps must really carry several
    # tokens and the crops must really drop some, or the test proves nothing.
    model = tiny_llama()
    ids = repetitive_prompt(model)
    reference = generate(model, ids, DynamicCache())
    hf.enable(model)
    recorder = StepRecorder(monkeypatch)
    # The cache's room is generate's max_new_tokens: prompt lookup's last drafts may run past it, which
    # assisted=True makes room for.
    cache = hf.KvtrimCache(model.config, kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.FP32(), layout,
                           max_new_tokens=16, assisted=True)
    assert generate(model, ids, cache, prompt_lookup_num_tokens=7) == reference
    assert max(recorder.steps) > 1, recorder.steps
    assert any(c > 0 for c in recorder.crops), recorder.crops
    accepted = cache.get_seq_length() - ids.shape[1]
    for layer in cache.kvtrim_caches():  # every head holds the prompt and exactly the accepted tokens
        assert (layer.head_lengths() == ids.shape[1] + accepted).all()
    assert all(l.seen == ids.shape[1] + accepted for l in cache.layers)


def test_prompt_lookup_over_a_compressed_cache_equals_one_token_per_step():
    # SnapKV at 50 %: the same compressed cache decoded one token per step, or by prompt lookup's
    # verified drafts with rollbacks, gives the same tokens and the same held lengths.
    model = tiny_llama()
    ids = repetitive_prompt(model)
    hf.enable(model)
    press = kvtrim.AdaKV(kvtrim.SnapKV(window=8, compression_ratio=0.5))
    one = hf.KvtrimCache(model.config, press, kvtrim.FP32(), "flat", max_new_tokens=16)
    drafted = hf.KvtrimCache(model.config, press, kvtrim.FP32(), "flat", max_new_tokens=16, assisted=True)
    assert generate(model, ids, drafted, prompt_lookup_num_tokens=3) == generate(model, ids, one)
    # The comparison needs both caches compressed over the same tokens: the prefill's drafts all rejected
    # (the next test covers accepted ones).
    assert all(l.seen - l.appended == ids.shape[1] for l in drafted.layers)
    for a, b in zip(one.kvtrim_caches(), drafted.kvtrim_caches()):
        assert (a.head_lengths() == b.head_lengths()).all()
        kept_a, kept_b = a.kept(), b.kept()
        assert all((x == y).all() for x, y in zip(kept_a, kept_b))


def test_assisted_generation_without_assisted_true_is_refused_clearly():
    # By default a layer compresses right after its prefill attention, so the drafts the prefill
    # carried are compressed with the prompt and cannot be cropped: the error says what to pass.
    model = tiny_llama()
    hf.enable(model)
    cache = hf.KvtrimCache(model.config, kvtrim.SnapKV(window=8, compression_ratio=0.5), kvtrim.FP32(), "flat",
                           max_new_tokens=24)
    with pytest.raises(NotImplementedError, match=r"assisted=True"):
        generate(model, repetitive_prompt(model), cache, prompt_lookup_num_tokens=4)


def feed(model, cache, ids):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


def test_drafts_of_the_prefill_partly_accepted_are_compressed_with_the_prompt():
    # assisted=True: a prefill of prompt + 3 drafts, 1 rejected (crop −1), then the next token: the
    # cache compresses prompt + 2 tokens, as a cache fed those 42 tokens directly (same kept sets,
    # window queries included; the logits within fp32 reassociation of the longer prefill's SDPA).
    model = tiny_llama()
    hf.enable(model)
    ids = prompt(model, tokens=40)
    drafts = torch.tensor([[5, 6, 7]])
    press = kvtrim.SnapKV(window=8, compression_ratio=0.5)
    direct = hf.KvtrimCache(model.config, press, kvtrim.FP32(), "flat", max_new_tokens=16)
    drafted = hf.KvtrimCache(model.config, press, kvtrim.FP32(), "flat", max_new_tokens=16, assisted=True)
    feed(model, direct, torch.cat([ids, drafts[:, :2]], dim=1))
    feed(model, drafted, torch.cat([ids, drafts], dim=1))
    drafted.crop(-1)
    assert drafted.get_seq_length() == 42 and all(l.kvtrim is None for l in drafted.layers)
    token = torch.tensor([[11]])
    expected, got = feed(model, direct, token), feed(model, drafted, token)
    assert torch.allclose(expected, got, rtol=0, atol=1e-5), (expected - got).abs().max()
    for a, b in zip(direct.kvtrim_caches(), drafted.kvtrim_caches()):
        assert all((x == y).all() for x, y in zip(a.kept(), b.kept()))
        assert (a.head_lengths() == b.head_lengths()).all()


def test_a_crop_before_compression_past_the_held_window_is_refused_intact():
    # The prefill keeps SnapKV's 8 window queries plus 7 spare rows: cropping 9 prompt tokens before
    # compression would leave fewer than the window; refused with nothing changed.
    model = tiny_llama()
    hf.enable(model)
    cache = hf.KvtrimCache(model.config, kvtrim.SnapKV(window=8, compression_ratio=0.5), kvtrim.FP32(), "flat",
                           max_new_tokens=16, assisted=True)
    feed(model, cache, prompt(model, tokens=40))
    with pytest.raises(NotImplementedError, match="window of 8"):
        cache.crop(-9)
    assert cache.get_seq_length() == 40
    assert all(l.pending[0].shape[2] == 40 and l.pending_queries.shape[2] == 15 for l in cache.layers)
    cache.crop(-7)  # the spare rows
    assert cache.get_seq_length() == 33 and all(l.pending_queries.shape[2] == 8 for l in cache.layers)


def test_crop_takes_back_generated_tokens_only():
    model = tiny_llama()
    hf.enable(model)
    ids = prompt(model, tokens=40)
    cache = hf.KvtrimCache(model.config, kvtrim.SnapKV(window=8, compression_ratio=0.5), kvtrim.FP32(), "contiguous",
                           max_new_tokens=16)
    feed(model, cache, ids)
    held = [c.head_lengths().copy() for c in cache.kvtrim_caches()]
    draft = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(9))
    logits = feed(model, cache, draft)
    assert logits.shape[1] == 5 and cache.get_seq_length() == 45
    cache.crop(-3)  # transformers 5: remove 3
    assert cache.get_seq_length() == 42
    for before, c in zip(held, cache.kvtrim_caches()):
        assert (c.head_lengths() == before + 2).all()
    cache.crop(0)  # nothing
    cache.crop(41)  # transformers 4: keep 41 positions
    assert cache.get_seq_length() == 41
    with pytest.raises(NotImplementedError, match="compressed prompt"):
        cache.crop(-2)  # one generated token left: the second would be a prompt token
    assert cache.get_seq_length() == 41  # refused before any layer changed
    for before, c in zip(held, cache.kvtrim_caches()):
        assert (c.head_lengths() == before + 1).all()
    cache.crop(torch.tensor(-1))  # a 0-d int64 tensor, as transformers 5.17's assisted decoding passes it
    assert type(cache.get_seq_length()) is int and cache.get_seq_length() == 40
    for before, c in zip(held, cache.kvtrim_caches()):
        assert (c.head_lengths() == before).all()
    with pytest.raises(TypeError):
        cache.crop(torch.tensor(-1.0))  # not a count


def test_crop_then_continue_equals_never_having_drafted():
    # Feeding a draft, cropping it whole and feeding the true token gives the logits of feeding the
    # true token directly (the cache is as if the draft never came).
    model = tiny_llama()
    hf.enable(model)
    ids = prompt(model, tokens=40)
    press = kvtrim.SnapKV(window=8, compression_ratio=0.5)
    plain = hf.KvtrimCache(model.config, press, kvtrim.FP32(), "paged", max_new_tokens=16)
    drafted = hf.KvtrimCache(model.config, press, kvtrim.FP32(), "paged", max_new_tokens=16)
    feed(model, plain, ids)
    feed(model, drafted, ids)
    feed(model, drafted, torch.tensor([[7, 8, 9, 10]]))
    drafted.crop(-4)
    token = torch.tensor([[11]])
    assert torch.equal(feed(model, plain, token), feed(model, drafted, token))


def test_more_than_eight_tokens_per_step_is_refused():
    model = tiny_llama()
    hf.enable(model)
    nine = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9]])
    deferred = hf.KvtrimCache(model.config, kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.FP32(), "contiguous",
                              max_new_tokens=16, assisted=True)
    feed(model, deferred, prompt(model, tokens=20))
    with pytest.raises(NotImplementedError, match="chunked prefill"):  # the step after a prefill not yet compressed
        feed(model, deferred, nine)
    cache = hf.KvtrimCache(model.config, kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.FP32(), "contiguous",
                           max_new_tokens=16)
    feed(model, cache, prompt(model, tokens=20))
    feed(model, cache, torch.tensor([[3]]))
    with pytest.raises(NotImplementedError, match="1 to 8"):
        feed(model, cache, nine)
    assert cache.get_seq_length() == 21  # refused in the first layer's update, nothing appended
    assert all((c.head_lengths() == 21).all() for c in cache.kvtrim_caches())


@pytest.mark.skipif(not (torch.cuda.is_available() and kvtrim.has_cuda), reason="needs a GPU and kvtrim built with CUDA")
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_prompt_lookup_on_the_gpu(monkeypatch, layout):
    # The CUDA path of assisted generation: multi-query decode on the device, truncate with counts on
    # the GPU (torch's current stream). Every token kept, so each head must hold the prompt and exactly
    # the accepted tokens (fp16 multi-query decode rounds in another order than one query at a time, so
    # the tokens themselves are not compared with greedy's here; the CPU tests compare them in fp32).
    model = tiny_llama(torch.float16, "cuda", head_dim=64)
    ids = repetitive_prompt(model).cuda()
    hf.enable(model)
    recorder = StepRecorder(monkeypatch)
    cache = hf.KvtrimCache(model.config, kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.FP16(), layout,
                           max_new_tokens=16, assisted=True)
    tokens = generate(model, ids, cache, prompt_lookup_num_tokens=4)
    assert len(tokens) == 16
    assert max(recorder.steps) > 1 and any(c > 0 for c in recorder.crops), (recorder.steps, recorder.crops)
    accepted = cache.get_seq_length() - ids.shape[1]
    for layer in cache.kvtrim_caches():
        assert layer.device == "cuda"
        assert (layer.head_lengths() == ids.shape[1] + accepted).all()
