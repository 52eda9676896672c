"""Decode-time eviction (issue 16) from Python: kvtrim.Eviction over one model's per-layer caches.

    caches = [kvtrim.Cache(kvtrim.SnapKV(window=32, tokens=keep - 16), kvtrim.FP16(), "paged", shape, B, capacity,
                           layer=l, layers=L) for l in range(L)]
    eviction = kvtrim.Eviction(caches, keep=keep, interval=16)      # keep: tokens per kv head between steps
    for l, cache in enumerate(caches):
        cache.compress(keys[l], values[l], window_queries[l])
        eviction.seed(l, keys[l], window_queries[l])                  # the prefill's metric
    for step in range(1, n + 1):                                      # decode
        for l, cache in enumerate(caches):
            cache.append(k_new[l], v_new[l])
            out[l] = eviction.attend(l, q_new[l])                     # attention + the metric
        if eviction.due(step):
            eviction.step()                                           # kvtrim::evict over every layer

The metric (eviction/metric.hpp: Σ over a GQA group of squared attention probabilities, tokens older
than the protected window) lives in one float32 vector per layer, indexed by storage slot, owned here as
an engine owns it beside its block tables: a NumPy array for CPU caches, a torch tensor on the GPU for
CUDA caches (device="cuda"). Caches on the paged layout with codec fp16 and StreamingLLM, SnapKV or
AdaKV(SnapKV) prefill compression (python/src/eviction.hpp says why).

On CUDA the same calls run on the device, on torch's current stream: seed and attend take float16
tensors on the cache's GPU (NumPy arrays and other dtypes are converted there first) and synchronise
nothing; step() waits for its own kernels, since it returns what the step did.

The metric one step late (``one_step_late=True``, CPU caches only; eviction/metric.hpp's carry): attend
at step t does not keep step t's logits; it adds step t − 1's contribution (recomputed from the queries
and softmax normaliser it kept, over the keys as they are now) and keeps step t's for the next call. So
after attend at step t the metric holds the prefill seed and decode steps ≤ t − 1. ``flush()`` adds the
pending step (one more pass over the keys): call it before reading ``metrics`` or before an eviction step
that must see the last decode step. ``step()`` flushes first, so it ranks exactly what the immediate mode
ranks: the same tokens are evicted, and after a flush the metric equals the immediate mode's bit for bit
(for the fp16 caches eviction is compiled for, whose stored keys never change). An eviction step without
a flush (kvtrim::evict in C++, or the binding's _eviction_step) still works: the pending step follows the
tokens an eviction moves and lands on them at the next attend or flush (evicted tokens lose it). The
carry belongs to the cache's current tokens: seed() clears it; after anything else that replaces a
cache's tokens (compress without seed, truncate) call seed() or ``clear(layer)``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np

from . import _kvtrim
from .cache import Cache, _torch_stream

__all__ = ["Eviction"]

_SCOPES = ("per_head", "per_layer", "cross_layer")
_KINDS = ("squared_sum", "sum", "squared_mean", "mean")


class Eviction:
    """kvtrim::evict over ``caches`` (one per layer, one scheme), every ``interval`` decode steps.

    keep: tokens per kv head the caches may hold on average between steps (a step keeps
    keep − interval, so the next interval's appends fit); scope: "cross_layer" (one threshold over every
    layer and kv head of a sequence, vllm-kvcompress), "per_layer" (Ada-KV floors) or "per_head";
    sinks and protected_window: never evicted; alpha: the per-head floor fraction; kind: the metric.
    one_step_late: accumulate the metric one decode step late (CPU caches only; the module docstring says
    what it means): this object then owns each layer's carry in ``carries`` (NumPy arrays ``queries``
    float32 [B·H_q·D], ``normaliser`` float32 [B·H_q·2], ``next`` int64 [B·H_kv]; next 0: nothing pending).
    """

    def __init__(self, caches: Sequence[Cache], keep: int, interval: int = 16, scope: str = "cross_layer",
                 sinks: int = 4, protected_window: int = 64, alpha: float = 0.2, kind: str = "squared_sum",
                 one_step_late: bool = False):
        if not caches or not all(isinstance(c, Cache) for c in caches):
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'caches': expected one kvtrim.Cache per layer, got {caches!r}")
        if scope not in _SCOPES:
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'scope': expected one of {', '.join(map(repr, _SCOPES))}, got {scope!r}")
        if kind not in _KINDS:
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'kind': expected one of {', '.join(map(repr, _KINDS))}, got {kind!r}")
        self.caches = list(caches)
        self.device = self.caches[0].device
        if any(c.device != self.device for c in self.caches):
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'caches': expected every layer's cache on one device, got "
                                f"{[c.device for c in self.caches]}")
        if not isinstance(one_step_late, (bool, np.bool_)):
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'one_step_late': expected True or False, got {one_step_late!r}")
        if one_step_late and self.device != "cpu":
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'one_step_late': expected False for caches on "
                                f"{self.device} (the metric one step late is CPU-only: CUDA eviction::attend refuses "
                                f"a carry), got True")
        self.one_step_late = bool(one_step_late)
        slots = [_kvtrim._eviction_metric_slots(c._impl) for c in self.caches]
        if self.device == "cpu":
            self.metrics = [np.zeros(n, np.float32) for n in slots]
        else:
            import torch

            self.metrics = [torch.zeros(n, dtype=torch.float32, device="cuda") for n in slots]
        # One step late: each layer's carry, zeroed (next = 0: nothing pending); None: immediate.
        self.carries = None
        if self.one_step_late:
            self.carries = []
            for c in self.caches:
                (q_heads, kv_heads, head_dim), batch = c.shape, c._impl.batch
                self.carries.append({"queries": np.zeros(batch * q_heads * head_dim, np.float32),
                                     "normaliser": np.zeros(batch * q_heads * 2, np.float32),
                                     "next": np.zeros(batch * kv_heads, np.int64)})
        # interval divides decode steps (due()): 0 would raise ZeroDivisionError there, not kvtrim.Error here.
        if isinstance(interval, (bool, np.bool_)) or not isinstance(interval, numbers.Integral) or interval < 1:
            raise _kvtrim.Error(f"kvtrim.Eviction: argument 'interval': expected at least one decode step (an int), "
                                f"got {interval!r}")
        self._metric = _kvtrim.EvictionMetricSettings()
        self._step = _kvtrim.EvictionStepSettings()
        # kvtrim::evict checks the values (at the first step); what the settings cannot hold at all (an int past
        # int64, a float for a count) is refused here in kvtrim's words, not as nanobind's TypeError.
        for settings, name, value in ((self._metric, "kind", kind), (self._metric, "protected_window", protected_window),
                                      (self._step, "scope", scope), (self._step, "keep", keep),
                                      (self._step, "interval", interval), (self._step, "sinks", sinks),
                                      (self._step, "protected_window", protected_window), (self._step, "alpha", alpha)):
            try:
                setattr(settings, name, value)
            except TypeError:
                expected = "a number" if name == "alpha" else "an integer in [-2^63, 2^63)"
                raise _kvtrim.Error(f"kvtrim.Eviction: argument '{name}': expected {expected}, got {value!r}") from None
        self.keep, self.interval = keep, interval

    def seed(self, layer: int, keys, window_queries, start_position: int = 0) -> None:
        """The prefill's metric of ``layer`` from its last prompt queries (after that cache's compress, with the
        same prefill keys [B, H_kv, T, D] and window queries [B, H_q, w, D]: float32 on the CPU, float16 on CUDA).
        After a compress with ``lengths=`` (a right-padded batch), CPU or CUDA, each sequence is seeded with
        the lengths that compress took: its window queries are the last w of its own prompt, and only its
        first lengths[b] keys are read (the padding may hold NaN).
        One step late: also drops the layer's pending step (its carry's next = 0), as the C++ seed_metric does."""
        if self.device == "cpu":
            _kvtrim._eviction_seed(self.caches[layer]._impl, np.ascontiguousarray(keys, np.float32),
                                   np.ascontiguousarray(window_queries, np.float32), start_position,
                                   self.metrics[layer], self._metric, **self._carry(layer))
            return
        keys, window_queries = self._on_device(keys), self._on_device(window_queries)
        _kvtrim._eviction_seed(self.caches[layer]._impl, keys, window_queries, start_position, self.metrics[layer],
                               self._metric, _torch_stream(keys))

    def attend(self, layer: int, queries):
        """Decode attention of ``layer`` ([B, H_q, D]: float32 on the CPU, float16 on CUDA) that also
        accumulates its metric; returns out like queries (a NumPy array, or a torch tensor on the GPU).
        One step late: adds the previous attend's metric and keeps this one's for the next attend or flush()."""
        if self.device == "cpu":
            queries = np.ascontiguousarray(queries, np.float32)
            out = np.empty_like(queries)
            _kvtrim._eviction_attend(self.caches[layer]._impl, queries, out, self.metrics[layer], self._metric,
                                     **self._carry(layer))
            return out
        queries = self._on_device(queries)
        out = queries.new_empty(queries.shape)
        _kvtrim._eviction_attend(self.caches[layer]._impl, queries, out, self.metrics[layer], self._metric,
                                 _torch_stream(queries))
        return out

    def due(self, decode_step: int) -> bool:
        """Whether decode step ``decode_step`` (from 1 after the prefill) is an eviction step."""
        return decode_step > 0 and decode_step % self.interval == 0

    def flush(self, layer: Optional[int] = None) -> None:
        """One step late: adds the pending decode step to the metric of ``layer`` (None: every layer) and
        clears it (eviction::flush_metric; one more pass over that layer's keys), so ``metrics`` then
        include every step attended so far — bit for bit the immediate mode's. Flushing again, or with
        nothing pending, adds nothing. In the immediate mode there is never anything pending: a no-op."""
        if not self.one_step_late:
            return
        for l in range(len(self.caches)) if layer is None else (layer,):
            _kvtrim._eviction_flush_metric(self.caches[l]._impl, self.metrics[l], self._metric,
                                           **self._carry(l))

    def clear(self, layer: Optional[int] = None) -> None:
        """One step late: drops the pending step of ``layer`` (None: every layer) without adding it — for a
        cache whose tokens were replaced other than through seed() (which clears it itself)."""
        if self.carries is not None:
            for l in range(len(self.caches)) if layer is None else (layer,):
                self.carries[l]["next"][:] = 0

    def step(self) -> dict:
        """One eviction step over every layer: what it did (evicted_tokens, freed_pages, units_evicted,
        units_over_target). One step late: flushes every layer first, so the step ranks tokens by every
        decode step so far and evicts exactly what the immediate mode would."""
        if self.device == "cpu":
            self.flush()
            return _kvtrim._eviction_step([c._impl for c in self.caches], self.metrics, self._step)
        return _kvtrim._eviction_step([c._impl for c in self.caches], self.metrics, self._step,
                                      _torch_stream(self.metrics[0]))

    def _carry(self, layer: int) -> dict:
        """The carry keywords of the bindings for ``layer`` (none in the immediate mode)."""
        if self.carries is None:
            return {}
        carry = self.carries[layer]
        return {"carry_queries": carry["queries"], "carry_normaliser": carry["normaliser"],
                "carry_next": carry["next"]}

    @staticmethod
    def _on_device(x):
        """x as a contiguous float16 torch tensor on the GPU (the CUDA fp16 caches' input type)."""
        import torch

        x = torch.as_tensor(x)
        if x.requires_grad:
            x = x.detach()
        return x.to(device="cuda", dtype=torch.float16).contiguous()
