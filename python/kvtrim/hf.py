"""Hugging Face transformers integration: a Cache whose layers are kvtrim caches.

    from transformers import LlamaConfig, LlamaForCausalLM
    import kvtrim, kvtrim.hf

    model = LlamaForCausalLM(LlamaConfig(...))
    kvtrim.hf.enable(model)                       # kvtrim's attention for this model
    cache = kvtrim.hf.KvtrimCache(model.config, kvtrim.AdaKV(kvtrim.SnapKV(window=8, compression_ratio=0.5)),
                                  layout="flat", max_new_tokens=32)
    model.generate(input_ids, past_key_values=cache, max_new_tokens=32)

What happens: at prefill every layer attends over the whole prompt as usual
(torch's SDPA, causal), then kvtrim compresses the layer's keys and values — with
the prompt's last queries for SnapKV/H2O — into a kvtrim cache sized for the
kept tokens plus ``max_new_tokens`` (ragged per-head budgets in a flat or paged
layout: only the kept tokens are stored, no masking). The prompt's full keys and
values are dropped. At every decode step the layer appends the new token's key
and value to its kvtrim cache and kvtrim's decode attention computes the output.

After prefill a step may feed 1 to 8 tokens (kvtrim's multi-query decode,
causal among the step's tokens): assisted generation with at most 7 candidates
(``prompt_lookup_num_tokens`` ≤ 7, or an assistant model with
``num_assistant_tokens`` ≤ 7 and ``num_assistant_tokens_schedule="constant"``: the
heuristic schedule grows it) verifies its candidates in one step, and ``crop``
rolls the rejected ones back (``kvtrim.Cache.truncate``). Tokens generated since the
compression can be cropped; the compressed prompt cannot (its dropped tokens are
gone) — and assisted generation's prefill carries the first drafts, whose
rejected tail it crops at once. So pass ``KvtrimCache(..., assisted=True)`` for
assisted generation: each layer then compresses at the step after the prefill
(or when ``kvtrim_caches()`` asks), after that crop, holding the prompt's full
keys and values of every layer until then (by default a layer compresses right
after its prefill attention, so the full prompt of only one layer is alive).

Limits: one sequence or a batch of equal-length prompts without padding; no
beam search; kvtrim's softmax scale is 1/√head_dim (Llama's). On the GPU the CUDA list is available
(every scorer and budget on every layout with FP16/BF16, RazorAttention on flat and
paged; kvtrim.schemes() lists it — KIVI runs with a CPU model until issue 12), and
the model's head_dim must be one the CUDA decode is compiled for (64, 128, 256). Written against transformers' layered Cache API (CacheLayerMixin,
transformers ≥ 4.56 / 5.x); checked on the GPU machine only (torch and
transformers are not installed in CI).
"""

from __future__ import annotations

import math
import operator
import threading
from typing import Optional

import torch

from .cache import Cache as _KvtrimCache
from .presses import FP16, Codec, Press

try:
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError as failure:  # pragma: no cover - depends on the installed transformers
    raise ImportError(
        "kvtrim.hf needs transformers with the layered Cache API (transformers.cache_utils.DynamicLayer, "
        "transformers >= 4.56)"
    ) from failure

__all__ = ["ATTENTION_NAME", "KvtrimCache", "KvtrimLayer", "enable", "register"]

ATTENTION_NAME = "kvtrim"
_active = threading.local()  # the layer whose update() ran last: its attention comes next


class KvtrimLayer(DynamicLayer):
    """One decoder layer's cache: the prompt's keys/values until compression, then a kvtrim cache."""

    def __init__(self, press: Press, codec: Codec, layout: str, layer_idx: int, layers: int, max_new_tokens: int,
                 page_size: int = 16, check: str = "sync", assisted: bool = False):
        super().__init__()
        self.press, self.codec, self.layout, self.check = press, codec, layout, check
        self.assisted = assisted  # compression waits for the step after the prefill (its drafts' crop first)
        self.layer_idx, self.layers, self.max_new_tokens, self.page_size = layer_idx, layers, max_new_tokens, page_size
        self.kvtrim: Optional[_KvtrimCache] = None
        self.pending = None  # (keys, values) of the prefill, until compress
        self.pending_queries = None  # the prefill's last queries (SnapKV/H2O's window), until compress
        self.seen = 0        # tokens processed (positions), not tokens held
        self.appended = 0    # tokens appended since the compression (what crop may take back)
        self.step_tokens = 0  # tokens of the last update after compression (the queries attention gets)

    def lazy_initialization(self, key_states, value_states=None):
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.empty(0, dtype=self.dtype, device=self.device)  # kvtrim holds the tokens
        self.values = torch.empty(0, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(self, key_states, value_states, cache_kwargs=None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        _active.layer = self
        count = key_states.shape[-2]
        if self.kvtrim is None and self.pending is None:
            self.pending = (key_states, value_states)
            self.seen += count
            return key_states, value_states  # prefill attends over the whole prompt
        if self.kvtrim is None:  # the first step after the prefill (and its crops): compress it now
            if count > MAX_STEP_TOKENS:
                raise NotImplementedError(f"kvtrim.hf: a second prefill chunk of {count} tokens (chunked prefill)")
            self.compress()
        if not 1 <= count <= MAX_STEP_TOKENS:
            raise NotImplementedError(
                f"kvtrim.hf: {count} tokens in one step after prefill (1 to {MAX_STEP_TOKENS}: kvtrim's multi-query "
                f"decode; for assisted generation keep num_assistant_tokens <= {MAX_STEP_TOKENS - 1})")
        k, v = self._cast(key_states), self._cast(value_states)
        self.kvtrim.append(k, v)
        self.seen += count
        self.appended += count
        self.step_tokens = count
        return key_states, value_states

    def _cast(self, x):
        # Contiguous as well: HF's keys come out of RoPE while values are a
        # transposed projection, and the CUDA backend reads keys and values
        # with one set of strides.
        want = torch.float32 if self.kvtrim.device == "cpu" else _TORCH_DTYPES[self.kvtrim._dtype]
        return (x if x.dtype == want else x.to(want)).contiguous()

    def hold_queries(self, query_states):
        """Keeps the prefill's queries the press needs (its window, plus the most a crop may cut from it
        before compression: a step's drafts, MAX_STEP_TOKENS - 1), until compress."""
        window = self.press.window_queries
        if window > 0:
            query_states = query_states[:, :, -(window + MAX_STEP_TOKENS - 1):]
        # A copy: a view would keep the whole prefill's queries alive until compress.
        self.pending_queries = (query_states if window else query_states[:, :, :0]).clone()

    def compress(self):
        """Compresses the pending prefill with kvtrim (at the first update after the prefill, or on demand)."""
        if self.pending_queries is None:
            raise RuntimeError("kvtrim.hf: the prefill ran without kvtrim's attention (call kvtrim.hf.enable(model))")
        keys, values = self.pending
        batch, kv_heads, tokens, head_dim = keys.shape
        query_states = self.pending_queries
        q_heads = query_states.shape[1]
        heads = batch * kv_heads
        # Assisted generation may append a full step of drafts in its last steps (prompt lookup does not cap
        # them at the tokens left): MAX_STEP_TOKENS - 1 more per head.
        room = self.max_new_tokens + (MAX_STEP_TOKENS - 1 if self.assisted else 0)
        if self.layout == "contiguous":
            capacity = self.press.max_keep(tokens) + room
        else:
            capacity = self.press.total_keep(tokens, heads) + heads * room
            if self.layout == "paged":
                capacity += heads * self.page_size  # each head's last page may be partly filled
        device = "cuda" if keys.device.type == "cuda" else "cpu"
        self.kvtrim = _KvtrimCache(self.press, self.codec, self.layout, (q_heads, kv_heads, head_dim), batch, capacity,
                                   device=device, layer=self.layer_idx, layers=self.layers, page_size=self.page_size,
                                   check=self.check)
        window = self.press.window_queries
        queries = None
        if window:
            queries = query_states if window < 0 else query_states[:, :, -window:]
            queries = self._cast(queries)
        self.kvtrim.compress(self._cast(keys), self._cast(values), queries)
        self.pending = self.pending_queries = None

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.seen

    def get_mask_sizes(self, cache_position, *args, **kwargs):
        # (kv_length, kv_offset); later transformers pass the query length instead of cache_position
        query_length = cache_position if isinstance(cache_position, int) else cache_position.shape[0]
        return self.seen + query_length, 0

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the newest tokens: ``-n`` removes n (transformers 5's form, what assisted generation calls
        with its rejected candidates); a positive value is the length to keep (transformers 4's form); 0 does
        nothing. After the compression only tokens appended since then can be dropped (kvtrim.Cache.truncate
        on every head, which also refuses what the codec cannot forget exactly: KIVI's tokens already sealed
        into a group, LowRank's before its last basis refresh, Layered's inner limit — and on CUDA, Layered
        and LowRank caches); before it, the pending prompt is cut like a DynamicLayer's."""
        drop = self._crop_count(tokens_to_remove)
        self._check_crop(drop)
        self._apply_crop(drop)

    def _crop_count(self, tokens_to_remove: int) -> int:
        # An int, or a 0-d integer tensor (what transformers 5.17's assisted decoding passes): a plain int,
        # so `seen` and get_seq_length() stay ints (a tensor there would leak into every later comparison).
        tokens_to_remove = operator.index(tokens_to_remove)
        if tokens_to_remove < 0:
            return -tokens_to_remove
        return 0 if tokens_to_remove == 0 else max(0, self.seen - tokens_to_remove)

    def _check_crop(self, drop: int) -> None:
        """Raises for a crop this layer cannot take (nothing changed); kvtrim.Cache.truncate's own checks
        (the codec's rollback limit) come in _apply_crop."""
        if drop <= 0:
            return
        if drop > self.seen:
            raise ValueError(f"kvtrim.hf: cropping {drop} tokens from a cache of {self.seen}")
        if self.kvtrim is None:
            if self.pending is not None:
                held, window = self.pending_queries.shape[2], self.press.window_queries
                if window > 0 and held - drop < min(window, self.pending[0].shape[2] - drop):
                    raise NotImplementedError(
                        f"kvtrim.hf: cropping {drop} prompt tokens before compression would leave the press fewer "
                        f"than its window of {window} queries ({held} held)")
            return
        if drop > self.appended:
            raise NotImplementedError(
                f"kvtrim.hf: cropping {drop} tokens, {self.appended} of them appended since the compression (the "
                f"compressed prompt's dropped tokens are gone; only generated tokens can be rolled back"
                + ("" if self.assisted else "; for assisted generation pass KvtrimCache(..., assisted=True)") + ")")

    def _apply_crop(self, drop: int) -> None:
        if drop <= 0:
            return
        if self.kvtrim is None:
            if self.pending is not None:  # the held query rows are the last ones: the dropped tokens' rows end them
                keys, values = self.pending
                self.pending = (keys[..., :-drop, :], values[..., :-drop, :])
                self.pending_queries = self.pending_queries[:, :, :max(0, self.pending_queries.shape[2] - drop)]
            self.seen -= drop
            return
        if self.kvtrim.device == "cuda":  # counts on the GPU: truncate runs on torch's current stream, after append
            self.kvtrim.truncate(torch.full((self.kvtrim._impl.batch,), drop, dtype=torch.int32, device=self.device))
        else:
            self.kvtrim.truncate(drop)  # raises, this layer unchanged, past the codec's rollback limit
        self.seen -= drop
        self.appended -= drop

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("kvtrim.hf: beam search over a compressed cache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvtrim.hf: repeating the batch of a compressed cache")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("kvtrim.hf: selecting sequences of a compressed cache")


class KvtrimCache(DynamicCache):
    """A transformers Cache (DynamicCache-like) whose layers compress with kvtrim after prefill.

    config: the model's config (num_hidden_layers). press/codec/layout: as for kvtrim.Cache.
    max_new_tokens: the room every head keeps for generated tokens. check: as for kvtrim.Cache ("sync": a
    CUDA paged/flat cache's refusal raises from the call; "deferred": no synchronisation per layer and
    decode step, call check_status() on kvtrim_caches() where a sync is acceptable). assisted: for assisted
    generation (an assistant model or prompt_lookup_num_tokens): each layer compresses at the step after the
    prefill, after generate's crop of the prefill's rejected drafts (the module docstring says what it costs).
    """

    def __init__(self, config, press: Press, codec: Optional[Codec] = None, layout: str = "contiguous",
                 max_new_tokens: int = 256, page_size: int = 16, check: str = "sync", assisted: bool = False):
        layers_count = config.get_text_config(decoder=True).num_hidden_layers if hasattr(config, "get_text_config") \
            else config.num_hidden_layers
        codec = codec or FP16()
        layers = [KvtrimLayer(press, codec, layout, i, layers_count, max_new_tokens, page_size, check, assisted)
                  for i in range(layers_count)]
        _HFCache.__init__(self, layers=layers)  # not DynamicCache.__init__: its layers are built here

    def crop(self, tokens_to_remove: int) -> None:
        """Every layer's crop (KvtrimLayer.crop), each checked before the first is applied, so a refused crop
        changes nothing — but for kvtrim.Cache.truncate's refusal of what a codec cannot forget, which
        comes per layer (earlier layers already cropped: the cache is then unusable for generation). On
        CUDA with check="deferred" truncate's device-side refusals surface at check_status()."""
        drops = [layer._crop_count(tokens_to_remove) for layer in self.layers]
        for layer, drop in zip(self.layers, drops):
            layer._check_crop(drop)
        for layer, drop in zip(self.layers, drops):
            layer._apply_crop(drop)

    def kvtrim_caches(self):
        """The kvtrim.Cache of every layer (None before prefill; a prefill not yet compressed is compressed now)."""
        for layer in self.layers:
            if layer.kvtrim is None and layer.pending is not None:
                layer.compress()
        return [layer.kvtrim for layer in self.layers]

    def bytes(self) -> int:
        """Bytes the kvtrim caches allocated, all layers together."""
        return sum(c.bytes for c in self.kvtrim_caches() if c is not None)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_STEP_TOKENS = 8  # kvtrim's multi-query decode: 1 to 8 new tokens per sequence and step


def kvtrim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: SDPA at prefill (then compress), kvtrim decode attention after."""
    layer = getattr(_active, "layer", None)
    if layer is None or layer.layer_idx != getattr(module, "layer_idx", layer.layer_idx):
        raise RuntimeError("kvtrim.hf: attention without a KvtrimCache (pass past_key_values=KvtrimCache(...))")
    head_dim = query.shape[-1]
    if scaling is not None and not math.isclose(scaling, head_dim ** -0.5, rel_tol=1e-6):
        raise NotImplementedError(f"kvtrim.hf: softmax scale {scaling} (kvtrim uses 1/sqrt(head_dim) = {head_dim ** -0.5})")
    if layer.kvtrim is None:  # prefill
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        layer.hold_queries(query)
        if not layer.assisted:  # else at the next update, after the crop of the prefill's drafts
            layer.compress()
        return output
    count = query.shape[2]  # query: [B, H_q, L, D], the L tokens the last update appended
    if count != layer.step_tokens:
        raise RuntimeError(f"kvtrim.hf: attention over {count} queries after an update of {layer.step_tokens} tokens")
    if count == 1:
        out = layer.kvtrim.attend(layer._cast(query[:, :, 0]))  # [B, H_q, D]
        return out.to(query.dtype).unsqueeze(1), None  # [B, 1, H_q, D]
    # Speculative verification: query row i attends to the head's tokens up to the i-th new one.
    out = layer.kvtrim.attend(layer._cast(query))  # [B, H_q, L, D]
    return out.to(query.dtype).transpose(1, 2), None  # [B, L, H_q, D]


def register() -> None:
    """Registers kvtrim's attention (and SDPA's mask builder) under the name 'kvtrim'."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvtrim_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def enable(model) -> None:
    """Makes `model` attend through kvtrim (prefill: SDPA; decode: kvtrim over the compressed cache)."""
    register()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (AttributeError, ValueError, KeyError):  # transformers without set_attn_implementation
        model.config._attn_implementation = ATTENTION_NAME
