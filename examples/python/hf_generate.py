"""model.generate with a kvtrim-compressed cache (Hugging Face transformers).

Builds a small random Llama from a LlamaConfig (no downloads), then generates
  1. with transformers' own DynamicCache (the reference),
  2. with kvtrim keeping every token (fp32 storage): the same greedy tokens,
  3. with Ada-KV over SnapKV keeping half of the prompt in a flat (ragged) layout,
  4. the same by prompt lookup decoding (assisted generation: drafts verified by
     kvtrim's multi-query decode, the rejected ones cropped), on a repetitive prompt,
and prints the tokens and the bytes each cache holds. On a GPU (and a kvtrim
built with CUDA) it also runs StreamingLLM in a contiguous fp16 cache and Ada-KV
over SnapKV in a paged fp16 cache on the device.

    python examples/python/hf_generate.py [--tokens 256] [--new 32]

Needs torch and transformers (>= 4.56); checked on the GPU machine only.
"""

import argparse

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvtrim
import kvtrim.hf


def tiny_llama(seed=0, dtype=torch.float32, device="cpu", head_dim=None):
    # head_dim=None: hidden_size / heads = 16. The GPU model asks for 64: kvtrim's
    # CUDA decode kernel is compiled for head dims 64, 128 and 256.
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
                         **({"head_dim": head_dim} if head_dim else {}))
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype=dtype, device=device).eval()


def generate(model, input_ids, new_tokens, cache, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


def prompt_lookup(model, input_ids, new_tokens, press, codec, layout):
    """One token a step and prompt lookup decoding over the same kvtrim scheme: (tokens, tokens, drafted steps)."""
    one = kvtrim.hf.KvtrimCache(model.config, press, codec, layout=layout, max_new_tokens=new_tokens)
    expected = generate(model, input_ids, new_tokens, one)
    drafted = kvtrim.hf.KvtrimCache(model.config, press, codec, layout=layout, max_new_tokens=new_tokens, assisted=True)
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: forwards.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        tokens = generate(model, input_ids, new_tokens, drafted, prompt_lookup_num_tokens=4)
    finally:
        hook.remove()
    return expected, tokens, sum(n > 1 for n in forwards[1:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=256, help="prompt length")
    parser.add_argument("--new", type=int, default=32, help="tokens to generate")
    args = parser.parse_args()

    model = tiny_llama()
    input_ids = torch.randint(1, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    reference = generate(model, input_ids, args.new, DynamicCache())
    kv_bytes_full = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * \
        (args.tokens + args.new) * (model.config.hidden_size // model.config.num_attention_heads) * 4

    kvtrim.hf.enable(model)
    keep_all = kvtrim.hf.KvtrimCache(model.config, kvtrim.StreamingLLM(compression_ratio=0.0), kvtrim.FP32(),
                                     layout="contiguous", max_new_tokens=args.new)
    same = generate(model, input_ids, args.new, keep_all)
    print("reference (DynamicCache)         :", reference)
    print("kvtrim, every token kept (fp32)  :", same, "— equal" if same == reference else "— DIFFERENT")

    press = kvtrim.AdaKV(kvtrim.SnapKV(window=16, kernel=5, compression_ratio=0.5), alpha=0.2)
    ada = kvtrim.hf.KvtrimCache(model.config, press, kvtrim.FP16(), layout="flat", max_new_tokens=args.new)
    tokens = generate(model, input_ids, args.new, ada)
    lengths = [c.head_lengths().tolist() for c in ada.kvtrim_caches()]
    print("kvtrim, Ada-KV + SnapKV, 50%, flat fp16:", tokens)
    print("  tokens held per kv head, per layer:", lengths)
    print(f"  bytes allocated: {ada.bytes()} (fp32 DynamicCache of the same run: {kv_bytes_full})")
    agreement = sum(a == b for a, b in zip(tokens, reference)) / len(reference)
    print(f"  agreement with the reference: {agreement:.0%}")

    # A phrase of 16 tokens repeated: prompt lookup drafts its continuations from the prompt.
    phrase = torch.randint(1, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(2))
    repetitive = phrase.repeat((args.tokens + 15) // 16)[: args.tokens].unsqueeze(0)
    expected, tokens, drafted = prompt_lookup(model, repetitive, args.new, press, kvtrim.FP16(), "flat")
    print("kvtrim, Ada-KV + SnapKV, 50%, flat fp16, prompt lookup:", tokens)
    print(f"  {drafted} steps verified several drafts at once;",
          "equal to one token a step" if tokens == expected else "DIFFERENT from one token a step")

    if torch.cuda.is_available() and kvtrim.has_cuda:
        gpu = tiny_llama(dtype=torch.float16, device="cuda", head_dim=64)
        ids = input_ids.cuda()
        reference = generate(gpu, ids, args.new, DynamicCache())
        kvtrim.hf.enable(gpu)
        cache = kvtrim.hf.KvtrimCache(gpu.config, kvtrim.StreamingLLM(sinks=4, compression_ratio=0.5), kvtrim.FP16(),
                                      layout="contiguous", max_new_tokens=args.new)
        tokens = generate(gpu, ids, args.new, cache)
        print("GPU fp16, StreamingLLM 50%, contiguous:", tokens)
        print(f"  bytes allocated on the GPU: {cache.bytes()}; agreement with DynamicCache: "
              f"{sum(a == b for a, b in zip(tokens, reference)) / len(reference):.0%}")
        press = kvtrim.AdaKV(kvtrim.SnapKV(window=16, kernel=5, compression_ratio=0.5), alpha=0.2)
        ragged = kvtrim.hf.KvtrimCache(gpu.config, press, kvtrim.FP16(), layout="paged", max_new_tokens=args.new)
        tokens = generate(gpu, ids, args.new, ragged)
        print("GPU fp16, Ada-KV + SnapKV 50%, paged:", tokens)
        print("  tokens held per kv head, per layer (read back from the device):",
              [c.head_lengths().tolist() for c in ragged.kvtrim_caches()])
        print(f"  bytes allocated on the GPU: {ragged.bytes()}; agreement with DynamicCache: "
              f"{sum(a == b for a, b in zip(tokens, reference)) / len(reference):.0%}")
        expected, tokens, drafted = prompt_lookup(gpu, repetitive.cuda(), args.new, press, kvtrim.FP16(), "paged")
        print("GPU fp16, Ada-KV + SnapKV 50%, paged, prompt lookup:", tokens)
        print(f"  {drafted} steps verified several drafts at once;",
              "equal to one token a step" if tokens == expected else "different from one token a step (fp16 "
              "multi-query decode rounds in another order than one query at a time)")


if __name__ == "__main__":
    main()
