"""Presses and codecs with the names a kvpress user knows, mapped onto kvtrim schemes.

A press says which tokens matter (the scorer) and how many each head keeps (the
budget); a codec says how each kept token is stored. ``Cache`` combines them with
a layout. Budgets are a kvpress ``compression_ratio`` (keep ``int(T * (1 - ratio))``
tokens per head, as kvpress does) or a token count ``tokens=``.

The configurations follow include/kvtrim/kvpress.hpp (docs/kvpress.md): with
``kvpress_compatible=True`` (the default here) AdaKV and Pyramid round as kvpress
0.5.4 does, so kept sets equal kvpress's.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from . import _kvtrim

__all__ = [
    "Press",
    "StreamingLLM",
    "SnapKV",
    "H2O",
    "ObservedAttention",
    "KeyNorm",
    "Knorm",
    "ExternalScores",
    "AdaKV",
    "Pyramid",
    "RazorAttention",
    "Codec",
    "FP16",
    "BF16",
    "FP32",
    "KIVI",
    "FP8",
    "LowRank",
    "Layered",
]


def _integer(function: str, argument: str, value, expected: str, at_least: Optional[int] = None) -> int:
    """``value`` as a Python int: ints and NumPy integers (a budget computed with NumPy is one), not bools,
    floats or strings (int(16.5) would be 16: a knob silently changed); else kvtrim.Error."""
    if not isinstance(value, bool):
        try:
            result = operator.index(value)
        except TypeError:
            pass
        else:
            if at_least is None or result >= at_least:
                return result
    raise _kvtrim.Error(f"{function}: argument '{argument}': expected {expected}, got {value!r}")


def _check_budget(compression_ratio: float, tokens: Optional[int]) -> None:
    if tokens is not None:
        _integer("kvtrim press", "tokens", tokens, "a token budget of at least 1", at_least=1)
    if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, numbers.Real)
            or not (0.0 <= compression_ratio < 1.0)):
        raise _kvtrim.Error(
            "kvtrim press: argument 'compression_ratio': expected a compression ratio in [0, 1) "
            f"(kvpress's assertion), got {compression_ratio!r}"
        )


class Press:
    """Base of every press: a scorer plus a budget."""

    scorer = ""
    budget = "uniform"
    compression_ratio = 0.0
    tokens: Optional[int] = None

    def _fill(self, s: "_kvtrim.Settings", layer: int, layers: int) -> None:
        s.scorer = self.scorer
        s.budget = self.budget
        s.compression_ratio = float(self.compression_ratio)
        s.keep_tokens = int(self.tokens or 0)
        s.layer = layer
        s.layers = layers

    def keep_per_head(self, tokens: int) -> int:
        """Tokens one head keeps out of ``tokens`` under a uniform budget (kvtrim's resolve_keep)."""
        if self.tokens:
            count = self.tokens
        else:
            count = math.floor((1.0 - self.compression_ratio) * tokens)
        return max(1, min(count, tokens))

    def max_keep(self, tokens: int) -> int:
        """An upper bound on what one head keeps out of ``tokens`` (sizes caches)."""
        return self.keep_per_head(tokens)

    def total_keep(self, tokens: int, heads: int) -> int:
        """An upper bound on what ``heads`` heads keep together out of ``tokens`` each."""
        return heads * self.max_keep(tokens)

    @property
    def window_queries(self) -> int:
        """How many of the last prefill queries the scorer reads (0: none; -1: all)."""
        return 0


@dataclass
class StreamingLLM(Press):
    """StreamingLLMPress: ``sinks`` first tokens plus the most recent ones (score::static_window)."""

    sinks: int = 4
    compression_ratio: float = 0.0
    tokens: Optional[int] = None
    windows: Sequence[int] = field(default_factory=list)
    scorer = "static_window"

    def __post_init__(self):
        _check_budget(self.compression_ratio, self.tokens)

    def _fill(self, s, layer, layers):
        super()._fill(s, layer, layers)
        s.sinks = self.sinks
        s.windows = list(self.windows)


@dataclass
class SnapKV(Press):
    """SnapKVPress(window_size, kernel_size): attention of the last ``window`` queries, pooled (score::snapkv)."""

    window: int = 64
    kernel: int = 5
    compression_ratio: float = 0.0
    tokens: Optional[int] = None
    pooling: str = "avg"
    reduction: str = "mean"
    group: str = "mean"
    scorer = "snapkv"

    def __post_init__(self):
        _check_budget(self.compression_ratio, self.tokens)

    def _fill(self, s, layer, layers):
        super()._fill(s, layer, layers)
        s.window, s.kernel = self.window, self.kernel
        s.pooling, s.reduction, s.group = self.pooling, self.reduction, self.group

    @property
    def window_queries(self) -> int:
        return self.window


@dataclass
class H2O(Press):
    """Heavy hitters: accumulated attention of every prefill query plus a recent window (score::h2o)."""

    recent: Union[float, int] = 0.1  # a fraction of the prompt (float) or a token count (int)
    compression_ratio: float = 0.0
    tokens: Optional[int] = None
    group: str = "mean"
    protect_recent: bool = True
    normalisation: str = "none"
    scorer = "h2o"

    def __post_init__(self):
        _check_budget(self.compression_ratio, self.tokens)
        # An int is a token count (NumPy's too), at least 1: 0 or -3 would read as "no count" and fall
        # back to the default fraction; a float is a fraction of the prompt, in (0, 1] (kvtrim checks it).
        if isinstance(self.recent, numbers.Integral) and not isinstance(self.recent, bool):
            _integer("kvtrim.H2O", "recent", self.recent,
                     "a recent window of at least 1 token (an int) or a fraction of the prompt in (0, 1] (a float)",
                     at_least=1)
        elif isinstance(self.recent, bool) or not isinstance(self.recent, numbers.Real):
            raise _kvtrim.Error(f"kvtrim.H2O: argument 'recent': expected a recent window of at least 1 token (an int) "
                                f"or a fraction of the prompt in (0, 1] (a float), got {self.recent!r}")

    def _fill(self, s, layer, layers):
        super()._fill(s, layer, layers)
        if isinstance(self.recent, numbers.Integral) and not isinstance(self.recent, bool):
            s.recent_tokens = int(self.recent)
        else:
            s.recent_tokens = 0
            s.recent_ratio = float(self.recent)
        s.protect_recent = self.protect_recent
        s.normalisation = self.normalisation
        s.group = self.group

    @property
    def window_queries(self) -> int:
        return -1


def ObservedAttention(compression_ratio: float = 0.0, tokens: Optional[int] = None) -> H2O:
    """ObservedAttentionPress: Σ attention / (T − j), no recent window (kvtrim::kvpress::observed_attention)."""
    return H2O(recent=1.0, compression_ratio=compression_ratio, tokens=tokens, protect_recent=False,
               normalisation="observed")


@dataclass
class KeyNorm(Press):
    """KnormPress: keeps the keys of smallest L2 norm (score::key_norm)."""

    compression_ratio: float = 0.0
    tokens: Optional[int] = None
    scorer = "key_norm"

    def __post_init__(self):
        _check_budget(self.compression_ratio, self.tokens)


Knorm = KeyNorm


@dataclass
class ExternalScores(Press):
    """Scores the caller computed (score::external): any kvpress scorer, a trained evictor, an engine's statistics.

    ``Cache.compress(keys, values, scores=s)`` takes them, ``s`` [B, H_kv, T] float32 on
    the cache's device (NumPy for a CPU cache, torch/CuPy for a CUDA one); kvtrim's
    budgets (uniform, or ``AdaKV(ExternalScores(...))``), layouts and codecs do the rest.
    Higher keeps first; +inf is always kept (a protected window); NaN ranks below every number.
    """

    compression_ratio: float = 0.0
    tokens: Optional[int] = None
    scorer = "external"

    def __post_init__(self):
        _check_budget(self.compression_ratio, self.tokens)


@dataclass
class AdaKV(Press):
    """AdaKVPress(press, alpha_safeguard): the inner press's scores, one budget shared by the heads (budget::adaptive)."""

    inner: Press = None
    alpha: float = 0.2
    kvpress_compatible: bool = True
    budget = "adaptive"

    def __post_init__(self):
        if not isinstance(self.inner, Press) or isinstance(self.inner, (AdaKV, Pyramid, RazorAttention)):
            raise _kvtrim.Error(f"kvtrim.AdaKV: argument 'inner': expected a scorer press (SnapKV, ...), got {self.inner!r}")

    @property
    def scorer(self):
        return self.inner.scorer

    @property
    def compression_ratio(self):
        return self.inner.compression_ratio

    @property
    def tokens(self):
        return self.inner.tokens

    @property
    def window_queries(self):
        return self.inner.window_queries

    def _fill(self, s, layer, layers):
        self.inner._fill(s, layer, layers)
        s.budget = "adaptive"
        s.alpha = self.alpha
        s.kvpress_compatible = self.kvpress_compatible

    def max_keep(self, tokens):
        return tokens  # one head may take the whole context from the shared pool

    def total_keep(self, tokens, heads):
        # The layer keeps H·k in total (kvpress form: ⌊α·k⌋ per head, then one bottom-k).
        return heads * self.keep_per_head(tokens)


@dataclass
class Pyramid(Press):
    """PyramidKVPress: the inner press's scores, budgets shrinking with depth (budget::pyramid)."""

    inner: Press = None
    window: Optional[int] = None  # tokens kept outside the schedule; default: the inner SnapKV window, else 0
    beta: int = 20
    kvpress_compatible: bool = True
    budget = "pyramid"

    def __post_init__(self):
        if not isinstance(self.inner, Press) or isinstance(self.inner, (AdaKV, Pyramid, RazorAttention)):
            raise _kvtrim.Error(f"kvtrim.Pyramid: argument 'inner': expected a scorer press (SnapKV, ...), got {self.inner!r}")

    @property
    def scorer(self):
        return self.inner.scorer

    @property
    def compression_ratio(self):
        return self.inner.compression_ratio

    @property
    def tokens(self):
        return self.inner.tokens

    @property
    def window_queries(self):
        return self.inner.window_queries

    def _fill(self, s, layer, layers):
        self.inner._fill(s, layer, layers)
        s.budget = "pyramid"
        if self.window is not None:
            s.pyramid_window = self.window
        else:
            s.pyramid_window = self.inner.window if isinstance(self.inner, SnapKV) else 0
        s.beta = self.beta
        s.kvpress_compatible = self.kvpress_compatible

    def max_keep(self, tokens):
        return tokens  # the schedule gives shallow layers more than the average


@dataclass
class RazorAttention(Press):
    """RazorAttention: retrieval heads keep everything, the others sinks + recent + a compensation token.

    ``profile`` is a calibration profile (``kvtrim.Profile`` or a path to its JSON) or
    the retrieval-head flags themselves, ``[layer][kv_head] -> bool``.
    """

    profile: object = None
    sinks: int = 4
    min_recent: int = 4000
    recent_fraction: float = 0.2
    compensation: bool = True
    scorer = "retrieval_head"
    budget = "by_scorer"

    def __post_init__(self):
        if isinstance(self.profile, (str, os.PathLike)):
            if not _kvtrim.has_profiles:
                raise _kvtrim.Error("kvtrim.RazorAttention: argument 'profile': expected flags, got a path "
                                    "(this build has no profile support: nlohmann-json was not found)")
            self.profile = _kvtrim.Profile.load(os.fspath(self.profile))

    def flags(self, layer: int):
        if hasattr(self.profile, "retrieval"):
            return list(self.profile.retrieval(layer))
        try:
            return [bool(x) for x in self.profile[layer]]
        except (TypeError, IndexError) as failure:
            raise _kvtrim.Error(
                f"kvtrim.RazorAttention: argument 'profile': expected a Profile or flags [layer][kv_head] "
                f"covering layer {layer}, got {self.profile!r}") from failure

    def _fill(self, s, layer, layers):
        super()._fill(s, layer, layers)
        s.retrieval = self.flags(layer)
        s.sinks = self.sinks
        s.min_recent = self.min_recent
        s.recent_fraction = self.recent_fraction
        s.compensation = self.compensation

    def max_keep(self, tokens):
        return tokens

    def total_keep(self, tokens, heads):
        return heads * tokens


# ---- codecs --------------------------------------------------------------------------


class Codec:
    name = ""

    def _fill(self, s) -> None:
        s.codec = self.name


@dataclass
class FP16(Codec):
    """Keys and values stored as IEEE fp16 (codec::fp16)."""

    name = "fp16"


@dataclass
class BF16(Codec):
    """Keys and values stored as bfloat16 (codec::bf16)."""

    name = "bf16"


@dataclass
class FP32(Codec):
    """Keys and values stored as fp32 (codec::fp32)."""

    name = "fp32"


@dataclass
class KIVI(Codec):
    """KIVI: keys quantized per channel in groups of ``group`` tokens (the group being filled stays fp16),
    values per token; ``bits`` 8 (codec::int8) or 4 (codec::int4, two codes per byte); zero points when
    ``asymmetric`` (KIVI's choice)."""

    bits: int = 8
    group: int = 32
    asymmetric: bool = True

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise _kvtrim.Error(f"kvtrim.KIVI: argument 'bits': expected 8 or 4, got {self.bits!r}")
        # kvtrim checks the upper bound; a group below 1 would otherwise surface as a pool-size overflow.
        _integer("kvtrim.KIVI", "group", self.group, "a group of at least 1 token (KIVI: 32)", at_least=1)

    @property
    def name(self):
        return f"int{self.bits}"

    def _fill(self, s):
        s.codec = self.name
        s.key_group = self.group
        s.asymmetric = self.asymmetric


@dataclass
class FP8(Codec):
    """fp8 e4m3 keys and values with one scale per head for each (codec::fp8).

    ``scales="head_amax"`` (default) sets each head's scales from its largest magnitude at compaction
    (later larger tokens saturate at ±448·scale); ``"fixed"`` uses ``key_scale`` / ``value_scale``.
    """

    scales: str = "head_amax"
    key_scale: float = 1.0
    value_scale: float = 1.0
    name = "fp8"

    def __post_init__(self):
        if self.scales not in ("head_amax", "fixed"):
            raise _kvtrim.Error(f"kvtrim.FP8: argument 'scales': expected 'head_amax' or 'fixed', got {self.scales!r}")

    def _fill(self, s):
        s.codec = "fp8"
        s.fp8_scales = self.scales
        s.fp8_key_scale = self.key_scale
        s.fp8_value_scale = self.value_scale


@dataclass
class LowRank(Codec):
    """Each token as ``rank`` fp16 coefficients in a per-head orthonormal basis (codec::low_rank; Eigen
    Attention, Palu, ShadowKV): a token x is stored as c = Uᵀx and read as U c.

    source: where the bases come from. ``"sequence"``: fitted at every compress from the SVD of each
    head's kept keys (and values), grown every ``update_freq`` appended tokens (CPU: Eigen; CUDA: on the
    device, update_freq ≤ 32, equal to the CPU's bases up to rounding and sign). ``"profile"``: calibrated offline and installed with ``Cache.set_basis(key_bases, value_bases)`` or, from a
    kvtrim.LowRankProfile (calibrate_layer, save, load; ranks per head), ``Cache.load_low_rank_profile``
    before the first compress (``rank`` or ``max_rank`` is then the most columns a basis may have; no refresh).

    rank: a fixed rank, or None for the smallest rank reaching ``energy`` (Eigen Attention's 0.98), at most
    ``max_rank`` (None: head_dim / 2; storage always holds max_rank coefficients per token).
    pre_rope: the keys given to compress/append are pre-RoPE (Palu, ShadowKV: a lower rank); kvtrim rotates
    each rebuilt key by its position with ``rope_theta`` / ``rotary_dim`` / ``interleaved`` inside attention.
    update_freq: appended tokens between basis refreshes (0: never).
    """

    rank: Optional[int] = None
    energy: float = 0.98
    max_rank: Optional[int] = None
    pre_rope: bool = False
    rope_theta: float = 10000.0
    rotary_dim: int = 0
    interleaved: bool = False
    update_freq: int = 16
    source: str = "sequence"
    name = "low_rank"

    def __post_init__(self):
        for argument in ("rank", "max_rank"):
            value = getattr(self, argument)
            if value is not None:
                _integer("kvtrim.LowRank", argument, value, "at least 1 or None", at_least=1)
        if self.source not in ("sequence", "profile"):
            raise _kvtrim.Error(f"kvtrim.LowRank: argument 'source': expected 'sequence' or 'profile', got {self.source!r}")

    def _fill(self, s):
        s.codec = "low_rank"
        s.rank = 0 if self.rank is None else int(self.rank)
        s.max_rank = 0 if self.max_rank is None else int(self.max_rank)
        s.energy = self.energy
        s.update_freq = self.update_freq
        s.key_space = "pre_rope" if self.pre_rope else "post_rope"
        s.rope_theta = self.rope_theta
        s.rotary_dim = self.rotary_dim
        s.rope_pairs = "interleaved" if self.interleaved else "half_split"
        s.low_rank_source = self.source


@dataclass
class Layered(Codec):
    """The first ``sinks`` and newest ``recent`` tokens of each head in fp16, the rest in ``inner``
    (codec::layered; compiled inner codecs: KIVI(bits=8), KIVI(bits=4)). Keys and values come in as fp16."""

    inner: Codec = field(default_factory=lambda: KIVI(bits=4))
    sinks: int = 4
    recent: int = 128

    def __post_init__(self):
        if not isinstance(self.inner, KIVI):
            raise _kvtrim.Error(f"kvtrim.Layered: argument 'inner': expected KIVI(bits=8) or KIVI(bits=4), got {self.inner!r}")

    @property
    def name(self):
        return f"layered<{self.inner.name}>"

    def _fill(self, s):
        self.inner._fill(s)
        s.codec = self.name
        s.layered_sinks = self.sinks
        s.layered_recent = self.recent
