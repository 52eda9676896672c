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
