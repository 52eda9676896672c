"""What the Python binding adds to one kvtrim call (issue 14: at most 20 µs per layer).

Times attend() and append() on a one-token cache, where kvtrim's own work is
well under a microsecond on the CPU, through three doors:
  C++ loop          Scheme::attend called from C++ on the same cache (the baseline)
  Cache.attend      the Python API (argument handling, output allocation or reuse)
  CacheImpl.attend  the nanobind entry point alone (DLPack import, checks, dispatch)
  nothing           an empty Python call, the floor
On a GPU (torch tensors, a device="cuda" cache) the same is timed without
synchronising, so it is host time per call: binding + kernel launch — for
StreamingLLM in a contiguous cache and for SnapKV in a paged one (Ada-KV's
ragged layouts: the paged decode plans per head on the device).

    python bench/python_overhead.py [--calls 20000]
"""

import argparse
import timeit

import numpy as np

import kvtrim


def measure(label, call, calls):
    best = min(timeit.repeat(call, number=calls, repeat=5)) / calls
    print(f"  {label:<34} {best * 1e6:8.2f} µs per call")
    return best


def run(device, calls, layout="contiguous"):
    # CPU: a tiny head so kvtrim's own work (the reference loops) is negligible;
    # GPU: a Llama-8B layer's shape (host time is launch + binding either way).
    shape, batch = ((1, 1, 8) if device == "cpu" else (32, 8, 128)), 1
    if device == "cpu":
        make = lambda *s: np.ones(s, np.float32)
        stream = 0
    else:
        import torch

        make = lambda *s: torch.ones(*s, dtype=torch.float16, device="cuda")
        stream = torch.cuda.current_stream().cuda_stream
    if layout == "contiguous":
        cache = kvtrim.Cache(kvtrim.StreamingLLM(tokens=1), kvtrim.FP16(), layout, shape, batch, 4096, device=device)
        kv = make(batch, shape[1], 1, shape[2])
        cache.compress(kv, kv)
    else:  # SnapKV over an 8-token window of a 16-token prompt, one token kept per head
        cache = kvtrim.Cache(kvtrim.SnapKV(window=8, kernel=5, tokens=1), kvtrim.FP16(), layout, shape, batch, 4096,
                             device=device)
        kv = make(batch, shape[1], 16, shape[2])
        cache.compress(kv, kv, make(batch, shape[0], 8, shape[2]))
    q, out = make(batch, shape[0], shape[2]), make(batch, shape[0], shape[2])
    print(f"{device}: {cache.name}, one token per head ({cache.head_lengths().sum()} held)")
    floor = measure("nothing (empty lambda)", lambda: None, calls)
    # The bare C++ call: the same Scheme::attend on the same cache and arrays, looped in C++.
    cxx = min(cache._impl._attend_seconds_from_cxx(q, out, stream, calls) for _ in range(5))
    print(f"  {'C++ Scheme::attend (in-process loop)':<34} {cxx * 1e6:8.2f} µs per call")
    impl = measure("CacheImpl.attend (nanobind)", lambda: cache._impl.attend(q, out, stream), calls)
    api = measure("Cache.attend(q, out)", lambda: cache.attend(q, out), calls)
    measure("Cache.attend(q) (allocates out)", lambda: cache.attend(q), calls)
    if device != "cpu":
        import torch

        torch.cuda.synchronize()
    print(f"  over the C++ call: nanobind entry +{(impl - cxx) * 1e6:.2f} µs, Python API +{(api - cxx) * 1e6:.2f} µs "
          f"(issue 14's bound: 20 µs); Python API over the nanobind call: {(api - impl) * 1e6:.2f} µs")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    run("cpu", args.calls)
    try:
        import torch

        if torch.cuda.is_available() and kvtrim.has_cuda:
            run("cuda", args.calls)
            run("cuda", args.calls, layout="paged")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
