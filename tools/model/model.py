"""A small byte-level decoder (RoPE, GQA) for kvtrim's fidelity study (docs/fidelity.md).

Llama-shaped on purpose, so that what kvtrim sees is what it sees in a real
model: pre-norm RMSNorm blocks, rotary positions on queries and keys (kvtrim
stores keys after RoPE), grouped-query attention with 8 query heads over 2 kv
heads of dimension 64 (the CUDA kernels are compiled for 64, 128, 256), a SwiGLU
MLP, softmax scale 1/sqrt(head_dim) (kvtrim's). Vocabulary: the 256 byte values.

Three ways through the model:
  forward(ids)                          training: causal SDPA over the whole sequence;
  forward(ids, capture=True)            prefill: also returns each layer's (q, k, v) after RoPE,
                                        what kvtrim compresses (k, v) and scores with (q), and
                                        the keys before RoPE (what a pre-RoPE low-rank codec takes);
  forward(ids, start=T, prefix=layers)  the continuation over a compressed prefix: each layer
                                        attends over that layer's kept keys/values (read back
                                        from kvtrim) plus the continuation itself, causally;
                                        or, with a callable per layer, one decode step whose
                                        attention the callable computes (q, k, v → out) over
                                        the caller's own cache (decode-time eviction).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    layers: int = 6
    width: int = 384
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    mlp: int = 1024
    vocab: int = 256
    context: int = 2304
    rope_base: float = 10000.0

    def to_dict(self):
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_tables(head_dim: int, positions: torch.Tensor, base: float):
    """cos, sin [L, head_dim/2] for the rotate-half convention (Llama's)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, H, L, D]: rotates pairs (i, i + D/2) by the position's angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)


class Prefix:
    """One layer's compressed prefix as the continuation sees it.

    keys, values [B, H_kv, P, D] (padded per head to the longest), bias [B, H_kv, P]:
    the logit added to each slot (0 for a kept token, ln N_d for RazorAttention's
    compensation token, -inf for padding).
    """

    def __init__(self, keys, values, bias):
        self.keys, self.values, self.bias = keys, values, bias


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.q = nn.Linear(c.width, c.q_heads * c.head_dim, bias=False)
        self.k = nn.Linear(c.width, c.kv_heads * c.head_dim, bias=False)
        self.v = nn.Linear(c.width, c.kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.q_heads * c.head_dim, c.width, bias=False)

    def forward(self, x, cos, sin, prefix: Optional[Prefix] = None, capture: Optional[list] = None):
        c = self.c
        B, L, _ = x.shape
        q = self.q(x).view(B, L, c.q_heads, c.head_dim).transpose(1, 2)
        k = self.k(x).view(B, L, c.kv_heads, c.head_dim).transpose(1, 2)
        v = self.v(x).view(B, L, c.kv_heads, c.head_dim).transpose(1, 2)
        k_pre_rope = k
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if capture is not None:
            capture.append((q, k, v, k_pre_rope))
        if prefix is None:
            group = c.q_heads // c.kv_heads  # each kv head serves `group` query heads (GQA)
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                 is_causal=True)
        elif callable(prefix):  # a decode step through the caller's own cache: out = prefix(q, k, v), [B, Hq, L, D]
            out = prefix(q, k, v)
        else:
            out = attend_over_prefix(q, k, v, prefix)
        return self.o(out.transpose(1, 2).reshape(B, L, c.q_heads * c.head_dim))


def attend_over_prefix(q, k, v, prefix: Prefix):
    """Softmax attention of continuation queries over [prefix slots ; continuation (causal)], in float32.

    q [B, Hq, C, D]; k, v [B, Hkv, C, D]. The prefix's bias carries kvtrim's
    per-slot logit (padding -inf, compensation ln N_d), added after the 1/sqrt(D)
    scale as kvtrim's decode attention adds it.
    """
    B, Hq, C, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    keys = torch.cat((prefix.keys.float(), k.float()), dim=2)      # [B, Hkv, P + C, D]
    values = torch.cat((prefix.values.float(), v.float()), dim=2)
    P = prefix.keys.shape[2]
    qg = q.float().view(B, Hkv, G, C, D)
    logits = torch.einsum("bhgcd,bhnd->bhgcn", qg, keys) / math.sqrt(D)
    causal = torch.full((C, C), float("-inf"), device=q.device).triu(1)
    bias = torch.cat((prefix.bias[:, :, None, :].expand(B, Hkv, C, P), causal.expand(B, Hkv, C, C)), dim=-1)
    probs = torch.softmax(logits + bias[:, :, None], dim=-1)
    out = torch.einsum("bhgcn,bhnd->bhgcd", probs, values)
    return out.reshape(B, Hq, C, D).to(q.dtype)


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(c.width), RMSNorm(c.width)
        self.attn = Attention(c)
        self.gate = nn.Linear(c.width, c.mlp, bias=False)
        self.up = nn.Linear(c.width, c.mlp, bias=False)
        self.down = nn.Linear(c.mlp, c.width, bias=False)

    def forward(self, x, cos, sin, prefix=None, capture=None):
        x = x + self.attn(self.norm1(x), cos, sin, prefix, capture)
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for p in (block.attn.o.weight, block.down.weight):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.layers))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids, start: int = 0, prefix: Optional[Sequence[Prefix]] = None, capture: bool = False):
        """ids [B, L] at positions start..start+L-1 → logits [B, L, vocab] (and captured (q, k, v) per layer)."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        cos, sin = rope_tables(self.c.head_dim, positions, self.c.rope_base)
        x = self.embed(ids)
        captured: Optional[List] = [] if capture else None
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if prefix is None else prefix[i], captured)
        logits = self.head(self.norm(x))
        return (logits, captured) if capture else logits
