"""The L2 flush before each timed call of the torch peers, the same way as bench/cuda_common.cuh.

KVTRIM_BENCH_FLUSH=read (the default): read a 256 MiB buffer, leaving the L2 full of clean lines (as
a decode step finds it after the layer's GEMMs streamed their weights). KVTRIM_BENCH_FLUSH=memset:
a 256 MiB memset, the method before 2026-12-07, whose last ~50 MB stay dirty in the L2 and are
written back during the timed call.
"""
import os

import torch

MODE = os.environ.get("KVTRIM_BENCH_FLUSH", "read")
if MODE not in ("read", "memset"):
    raise SystemExit(f"KVTRIM_BENCH_FLUSH={MODE}: expected read or memset")


class L2Flush:
    def __init__(self, device="cuda"):
        self.buffer = torch.zeros(256 << 20, dtype=torch.uint8, device=device)
        self.words = self.buffer.view(torch.int32)

    def __call__(self):
        if MODE == "memset":
            self.buffer.zero_()
        else:
            torch.sum(self.words)  # reads every byte; the scalar result is dropped
