"""torch and CuPy tensors through DLPack (skipped where absent; the CUDA parts need a GPU and a CUDA build)."""

import numpy as np
import pytest

import kvtrim
from oracle import attention, attention_bound, random_layer, streaming_kept

torch = pytest.importorskip("torch")
cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kvtrim.has_cuda), reason="needs a GPU and kvtrim built with CUDA")


def test_torch_cpu_tensors_equal_numpy(rng):
    keys, values, wq = random_layer(rng, 1, 4, 2, 48, 16, window=8)
    queries = rng.standard_normal((1, 4, 16)).astype(np.float32)
    outs = []
    for wrap in (lambda x: x, torch.from_numpy):
        cache = kvtrim.Cache(kvtrim.SnapKV(window=8, compression_ratio=0.5), kvtrim.FP16(), "flat", (4, 2, 16), 1, 128)
        cache.compress(wrap(keys), wrap(values), wrap(wq))
        out = cache.attend(wrap(queries))
        outs.append(np.asarray(out))
    assert np.array_equal(outs[0], outs[1])


def test_torch_bf16_cpu_tensors_are_widened(rng):
    keys = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    values = torch.randn(1, 2, 32, 16, dtype=torch.bfloat16)
    a = kvtrim.Cache(kvtrim.KeyNorm(compression_ratio=0.5), kvtrim.BF16(), "contiguous", (4, 2, 16), 1, 16)
    b = kvtrim.Cache(kvtrim.KeyNorm(compression_ratio=0.5), kvtrim.BF16(), "contiguous", (4, 2, 16), 1, 16)
    a.compress(keys, values)
    b.compress(keys.float(), values.float())
    q = torch.randn(1, 4, 16)
    assert torch.equal(a.attend(q), b.attend(q))


def test_cuda_tensor_into_a_cpu_cache_is_refused():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    cache = kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP32(), "contiguous", (4, 2, 16), 1, 16)
    k = torch.randn(1, 2, 32, 16, device="cuda")
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected a 4-d float32 array on the cpu, got float32 \[1, 2, 32, 16\] on cuda:0"):
        cache.compress(k, k)


@cuda
@pytest.mark.parametrize("dtype,codec", [(torch.float16, kvtrim.FP16()), (torch.bfloat16, kvtrim.BF16()), (torch.float32, kvtrim.FP32())])
def test_gpu_streaming_llm_equals_the_cpu_reference(rng, dtype, codec):
    batch, q_heads, kv_heads, tokens, dim, keep = 2, 8, 2, 200, 64, 48
    keys = torch.randn(batch, kv_heads, tokens, dim, dtype=dtype)
    values = torch.randn(batch, kv_heads, tokens, dim, dtype=dtype)
    new = torch.randn(batch, kv_heads, 2, dim, dtype=dtype)
    queries = torch.randn(batch, q_heads, dim, dtype=dtype)
    press = kvtrim.StreamingLLM(sinks=4, tokens=keep)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # kvtrim runs on torch's current stream
        gpu = kvtrim.Cache(press, codec, "contiguous", (q_heads, kv_heads, dim), batch, keep + 2, device="cuda")
        gpu.compress(keys.cuda(), values.cuda())
        gpu.append(new.cuda(), new.cuda())
        out = gpu.attend(queries.cuda())
    stream.synchronize()
    assert out.device.type == "cuda" and out.dtype == dtype
    cpu = kvtrim.Cache(press, codec, "contiguous", (q_heads, kv_heads, dim), batch, keep + 2)
    cpu.compress(keys, values)
    cpu.append(new, new)
    assert np.array_equal(gpu.head_lengths(), cpu.head_lengths())
    kept = streaming_kept(tokens, 4, keep)
    kk = [[np.concatenate([keys[b, h, kept].float().numpy(), new[b, h].float().numpy()]) for h in range(kv_heads)] for b in range(batch)]
    vv = [[np.concatenate([values[b, h, kept].float().numpy(), new[b, h].float().numpy()]) for h in range(kv_heads)] for b in range(batch)]
    q = queries.float().numpy()
    oracle = attention(q, kk, vv, kv_heads)
    out_rounding = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0}[dtype]
    bound = attention_bound(q, kk, vv, kv_heads) + out_rounding * np.abs(oracle).max() * 2
    assert np.all(np.abs(out.float().cpu().numpy() - oracle) <= bound)


@cuda
def test_gpu_cache_checks_dtype_and_device():
    gpu = kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "contiguous", (4, 2, 16), 1, 16, device="cuda")
    k = torch.randn(1, 2, 32, 16, device="cuda")
    with pytest.raises(kvtrim.Error, match=r"argument 'keys': expected a 4-d float16 array on the cuda device, got float32"):
        gpu.compress(k, k)
    with pytest.raises(kvtrim.Error, match=r"on the cuda device, got float16 \[1, 2, 32, 16\] on cpu"):
        gpu.compress(k.half().cpu(), k.half().cpu())


@cuda
def test_cupy_arrays():
    # head_dim 64: the CUDA decode kernel is compiled for 64, 128 and 256.
    cupy = pytest.importorskip("cupy")
    gpu = kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "contiguous", (4, 2, 64), 1, 16, device="cuda")
    cpu = kvtrim.Cache(kvtrim.StreamingLLM(tokens=8), kvtrim.FP16(), "contiguous", (4, 2, 64), 1, 16)
    k = cupy.random.standard_normal((1, 2, 32, 64)).astype(cupy.float16)
    q = cupy.random.standard_normal((1, 4, 64)).astype(cupy.float16)
    gpu.compress(k, k)
    cpu.compress(k.get(), k.get())
    out = gpu.attend(q)
    assert isinstance(out, cupy.ndarray)
    # Same kept tokens and stored rows (fp16 in, fp16 stored: exact); the outputs differ by
    # the GPU's fp16 output rounding (≤ 2^-11·|out| ≤ 2^-11·max|v|) plus fp32 summation order.
    expected = cpu.attend(q.get())
    bound = 2.0 ** -11 * float(np.abs(k.get()).max()) + 1e-4
    np.testing.assert_allclose(out.get().astype(np.float32), expected, rtol=0, atol=bound)
