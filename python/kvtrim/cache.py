"""kvtrim.Cache: one layer's compressed KV cache, owned by kvtrim, driven from Python.

Arrays are passed through DLPack without copies: NumPy arrays for a CPU cache,
torch or CuPy tensors for a CUDA cache (read on torch's current stream, or
CuPy's, when one of theirs is given). A CPU cache computes in float32: float16
and bfloat16 inputs are widened first (exactly, so results equal those of a C++
caller passing the 16-bit arrays); a CUDA cache reads its codec's own element
type in place (torch.float16 for FP16(), ...).
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _kvtrim
from .presses import FP16, Codec, Press

__all__ = ["Cache", "schemes"]

_LAYOUTS = ("contiguous", "flat", "paged")


def schemes():
    """Every compiled scheme as (device, layout, scorer, budget, codec)."""
    return list(_kvtrim.schemes())


def _library(x) -> str:
    module = type(x).__module__.split(".")[0]
    return module if module in ("numpy", "torch", "cupy") else "other"


def _torch_stream(x) -> int:
    """The raw cudaStream_t of torch's current stream on x's device.

    torch._C._cuda_getCurrentRawStream returns the pointer without building a
    torch.cuda.Stream object (≈ 0.3 µs against ≈ 4 µs: a decode step calls this
    once per layer, and issue 14 bounds the binding's cost at 20 µs per call).
    """
    import torch  # only reached for torch tensors

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(x.get_device())
    return torch.cuda.current_stream(x.device).cuda_stream


def _cupy_stream() -> int:
    import cupy  # only reached for CuPy arrays

    return cupy.cuda.get_current_stream().ptr


class Cache:
    """One layer's KV cache compressed with ``press`` and stored with ``codec`` in ``layout``.

    shape: (q_heads, kv_heads, head_dim). capacity: token slots — per head for
    ``layout="contiguous"``, in the whole pool for ``"flat"`` and ``"paged"``
    (paged: rounded up to pages of ``page_size``). ``layer``/``layers`` place the
    cache in the model (Pyramid's schedule and RazorAttention's flags read them).

    check (CUDA paged and flat caches): when a refusal the device finds — the pool or
    buffer exhausted, positions past 2^31, a NaN/Inf input, Ada-KV's paper form over its
    budget — raises kvtrim.Error. The device cannot throw: the refused call writes
    nothing (the cache stays as it was) and records the failure in the cache's status
    words. ``"sync"`` (the default) reads them at the end of every compress and append,
    so the call that was refused raises, with the CPU's message: one stream
    synchronisation per call. ``"deferred"`` never synchronises on the hot path (CUDA
    graphs, an engine's decode loop): call ``check_status()`` where a sync is acceptable
    (every few steps, after a graph replay); the inspection calls (head_lengths, kept,
    positions, read, stats), which synchronise anyway, check first as well, and so does
    CUDA ``Eviction.seed``. Calls after a refused one ran on the unchanged cache — but a
    refused compress's selection is what ``kept()`` (and the eviction seed) describe once
    its refusal has been raised: compress again before reading them. CPU and contiguous
    caches raise from the call itself whatever ``check`` says.
    """

    def __init__(
        self,
        press: Press,
        codec: Optional[Codec] = None,
        layout: str = "contiguous",
        shape: Sequence[int] = (),
        batch: int = 1,
        capacity: int = 0,
        *,
        device: str = "cpu",
        layer: int = 0,
        layers: int = 1,
        page_size: int = 16,
        check: str = "sync",
    ):
        if not isinstance(press, Press):
            raise _kvtrim.Error(f"kvtrim.Cache: argument 'press': expected a press (StreamingLLM(), SnapKV(), ...), got {press!r}")
        codec = FP16() if codec is None else codec
        if not isinstance(codec, Codec):
            raise _kvtrim.Error(f"kvtrim.Cache: argument 'codec': expected a codec (FP16(), BF16(), FP32(), KIVI(), FP8(), LowRank(), Layered()), got {codec!r}")
        if layout not in _LAYOUTS:
            raise _kvtrim.Error(f"kvtrim.Cache: argument 'layout': expected one of {', '.join(map(repr, _LAYOUTS))}, got {layout!r}")
        try:
            # operator.index: ints and NumPy integers; int() would turn 16.5 into 16 or "16" into 16.
            q_heads, kv_heads, head_dim = (_int64("shape", operator.index(x)) for x in shape)
        except (TypeError, ValueError):
            raise _kvtrim.Error(f"kvtrim.Cache: argument 'shape': expected (q_heads, kv_heads, head_dim), got {shape!r}") from None
        batch, capacity = (_size_argument(name, value) for name, value in (("batch", batch), ("capacity", capacity)))
        device = str(device)
        if device.startswith("cuda"):
            device = "cuda"
        settings = _kvtrim.Settings()
        knobs = _Knobs(settings)
        knobs.device = device
        knobs.layout = layout
        knobs.page_size = page_size
        knobs.check = str(check)
        press._fill(knobs, layer, layers)
        codec._fill(knobs)
        self.press, self.codec, self.layout, self.device = press, codec, layout, device
        self.layer, self.layers = layer, layers
        self.shape = (q_heads, kv_heads, head_dim)
        self.settings = settings
        self._impl = _kvtrim.CacheImpl(settings, q_heads, kv_heads, head_dim, batch, capacity)
        self._dtype = self._impl.input_dtype  # float32 on the CPU; the codec's element type on CUDA

    # ---- arrays ------------------------------------------------------------------------

    def _input(self, function: str, argument: str, x):
        """Widens 16-bit host arrays to float32 (CPU caches); returns (array, stream).

        A NumPy array in the other byte order ('>f4' on a little-endian host) is swapped into a
        native copy first (exact, like the widening; DLPack carries no byte order, so nanobind
        would refuse it with a message that names neither the call nor the argument), and one whose
        elements are no numbers at all (object, str, void) is refused here, in kvtrim's words.
        """
        if type(x) is np.ndarray:  # the hot path of a CPU cache: nothing to do for aligned float32
            if x.dtype != np.float32:
                x = _numpy_input(function, argument, x, widen=self.device == "cpu")
            if not x.flags.aligned:  # kvtrim reads elements at their type's alignment (C++): an aligned copy
                x = x.copy()
            return x, 0
        library = _library(x)
        if library == "torch":
            if x.requires_grad:
                x = x.detach()  # DLPack exports no tensor that requires grad; kvtrim only reads it
            if x.is_cuda:  # an attribute read: cheaper than building x.device
                return x, _torch_stream(x)
            if self.device == "cpu" and x.dtype in _torch_half_types():
                x = x.float()
            return x, 0
        if library == "cupy":
            return x, _cupy_stream()
        if not hasattr(x, "__dlpack__"):
            raise _kvtrim.Error(f"{function}: argument '{argument}': expected a NumPy array, torch tensor or CuPy "
                                f"array (DLPack), got {type(x).__name__}")
        return x, 0

    def _new_output(self, queries):
        library = _library(queries)
        if library == "torch":
            import torch

            return torch.empty(tuple(queries.shape), dtype=queries.dtype, device=queries.device)
        if library == "cupy":
            import cupy

            return cupy.empty(queries.shape, dtype=queries.dtype)
        return np.empty(tuple(np.shape(queries)), dtype=np.float32 if self.device == "cpu" else queries.dtype)

    # ---- the pipeline --------------------------------------------------------------------

    def compress(self, keys, values, window_queries=None, scores=None, lse=None, lengths=None) -> None:
        """Scores the prefill's keys/values [B, H_kv, T, D], keeps each head's budget, replaces what the cache held.

        window_queries [B, H_q, w, D]: the last prefill queries (SnapKV reads its
        window of them; H2O all T). Ignored by scorers that read none.
        scores [B, H_kv, T] float32, on the cache's device: the caller's scores
        (ExternalScores only; higher keeps first, +inf always kept). Ignored otherwise.
        lse [B, H_q, w] float32, on the cache's device: the prefill attention's softmax
        normalisers of window_queries (FlashAttention's softmax_lse: ln of the sum of
        exp(q.k / sqrt(D)) over every key up to the query; FlashInfer's base-2 LSE times ln 2).
        SnapKV and H2O then skip computing them (on CUDA, one of their two passes over
        the keys); other scorers refuse it. None: computed.
        lengths (CPU and CUDA caches; host integers): each sequence's prompt length in a right-padded batch, B
        integers in [1, T] (a list, tuple or NumPy array): sequence b's prompt is tokens
        [0, lengths[b]) (the padding is never read), its window_queries the last w queries
        of its own prompt (H2O: all T padded queries, of which it reads the first lengths[b]),
        and it ends up exactly as if compressed alone
        (docs/composition.md, "Prompts of different lengths in one batch"). None: all T.
        """
        function = "kvtrim.Cache.compress"
        keys, stream = self._input(function, "keys", keys)
        values, _ = self._input(function, "values", values)
        if window_queries is not None:
            window_queries, _ = self._input(function, "window_queries", window_queries)
            if not self._impl.needs_queries:
                window_queries = None
        if scores is not None:
            if not self._impl.needs_scores:
                scores = None
            elif type(scores) is np.ndarray:
                if scores.dtype != np.float32:  # float32 only (not widened): byte order and non-numbers here
                    scores = _numpy_input(function, "scores", scores, widen=False)
                if not scores.flags.aligned:
                    scores = scores.copy()
            elif _library(scores) == "torch":
                if scores.requires_grad:
                    scores = scores.detach()
            elif _library(scores) != "cupy" and not hasattr(scores, "__dlpack__"):
                raise _kvtrim.Error(f"{function}: argument 'scores': expected a NumPy array, torch tensor or CuPy "
                                    f"array (DLPack), got {type(scores).__name__}")
        if lse is not None:
            lse, _ = self._input(function, "lse", lse)
        if lengths is not None:
            lengths = _lengths_argument(function, lengths)
        self._impl.compress(keys, values, window_queries, scores, lse, lengths, stream)

    def append(self, keys, values) -> None:
        """Appends keys/values [B, H_kv, n, D] after what every head holds."""
        function = "kvtrim.Cache.append"
        keys, stream = self._input(function, "keys", keys)
        values, _ = self._input(function, "values", values)
        self._impl.append(keys, values, stream)

    def attend(self, queries, out=None):
        """Decode attention over the cache: queries [B, H_q, D] → out [B, H_q, D], or [B, H_q, L, D] → [B, H_q, L, D].

        [B, H_q, L, D] (speculative decoding's verification, 1 ≤ L ≤ 8): the L new tokens of every
        sequence, already appended, are the last L tokens of every head, and query row i attends
        causally to the head's first n − L + 1 + i tokens (n: the head's length). L = 1 equals the
        [B, H_q, D] form. Any strides with a contiguous last axis: an engine's flat query rows
        [B·L, H_q, D] are ``q.view(B, L, H_q, D).transpose(1, 2)``, no copy (and ``out`` likewise).
        ``out`` (optional) must have the queries' shape.
        """
        queries, stream = self._input("kvtrim.Cache.attend", "queries", queries)
        if out is None:
            out = self._new_output(queries)
        elif type(out) is np.ndarray:
            _numpy_output("kvtrim.Cache.attend", "out", out)
        self._impl.attend(queries, out, stream)
        return out

    def truncate(self, drop) -> None:
        """Rolls back the newest ``drop[b]`` tokens of every kv head of sequence b (speculative decoding's rejected drafts).

        drop: an int (the same count for every sequence), a sequence of B ints, a NumPy integer array
        [B], or an int32 torch/CuPy tensor [B] (on the CPU, or on the cache's GPU for a CUDA cache:
        read there, no copy). Afterwards the cache holds what it would hold had only the accepted
        tokens been appended (kvtrim::scheme::truncate, docs/composition.md §8). Refused with
        kvtrim.Error, the cache unchanged, for a negative count, a count past a head's length, past
        what the codec can forget exactly (KIVI: the tokens of its fp16 residual group; LowRank with
        sequence bases: those since the last basis refresh; Layered: its inner codec's and its recent
        rows' limit), unequal counts on the contiguous layout, or a codec that does not roll back on
        CUDA (Layered, LowRank). A CUDA paged/flat cache checks on the device (``check``).
        """
        stream = 0
        batch = self._impl.batch
        if isinstance(drop, (bool, np.bool_)):
            raise _kvtrim.Error(f"kvtrim.Cache.truncate: argument 'drop': expected an int or [{batch}] int32 counts, got {drop!r}")
        if isinstance(drop, (int, np.integer)):
            drop = np.full(batch, _int32("drop", int(drop)), dtype=np.int32)
        elif isinstance(drop, (list, tuple)):
            if not all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in drop):
                raise _kvtrim.Error(f"kvtrim.Cache.truncate: argument 'drop': expected {batch} int counts, got {drop!r}")
            drop = np.array([_int32("drop", int(x)) for x in drop], dtype=np.int32)
        elif type(drop) is np.ndarray:
            if drop.dtype.kind not in "iu":
                raise _kvtrim.Error(f"kvtrim.Cache.truncate: argument 'drop': expected integer counts [{batch}], "
                                    f"got {drop.dtype} {list(drop.shape)}")
            if drop.dtype != np.int32:
                if drop.size and (drop.min() < np.iinfo(np.int32).min or drop.max() > np.iinfo(np.int32).max):
                    raise _kvtrim.Error(f"kvtrim.Cache.truncate: argument 'drop': expected counts that fit in int32, "
                                        f"got {drop.min()} .. {drop.max()}")
                drop = drop.astype(np.int32)
        else:
            library = _library(drop)
            if library == "torch" and drop.is_cuda:
                stream = _torch_stream(drop)
            elif library == "cupy":
                stream = _cupy_stream()
            elif not hasattr(drop, "__dlpack__"):
                raise _kvtrim.Error(f"kvtrim.Cache.truncate: argument 'drop': expected an int, a list of ints or an "
                                    f"int32 array [{batch}], got {type(drop).__name__}")
        self._impl.truncate(drop, stream)

    def set_basis(self, key_bases, value_bases) -> None:
        """Installs LowRank(source="profile") bases: key_bases, value_bases [H_kv, D, r] float32 (NumPy, host).

        Basis h (D × r, orthonormal columns to 1e-3; r ≤ the stored rank: ``rank``, or ``max_rank``)
        serves kv head h of every sequence; a token is stored as c = Uᵀx (fp16) and read as U c.
        Call before compress (and again to replace them: tokens stored earlier keep their
        coefficients). Key and value ranks may differ. Everything is checked before the first basis
        is installed. On CUDA the bases are copied to the device (synchronised: a setup step).
        """
        stream = 0
        if self.device == "cuda":
            for x in (key_bases, value_bases):
                if _library(x) == "torch" and x.is_cuda:
                    stream = _torch_stream(x)
        self._impl.set_basis(_host_float32(key_bases, "key_bases"), _host_float32(value_bases, "value_bases"), stream)

    def load_low_rank_profile(self, profile, layer: Optional[int] = None) -> None:
        """Installs layer ``layer`` (default: this cache's ``layer``) of a kvtrim.LowRankProfile into every head.

        The profile's bases of kv head h serve head h of every sequence, as ``set_basis`` would install
        them, but each head keeps its own calibrated ranks (each ≤ the stored rank: ``rank``, else
        ``max_rank``, else head_dim / 2). For LowRank(source="profile") caches; call before compress.
        The profile must match the cache: its head_dim and kv_heads, and its key space — a pre_rope
        profile (calibrated from pre-RoPE keys) loads only into a LowRank(pre_rope=True) cache, a
        post_rope one only into pre_rope=False. Everything (those, the layer, every head's ranks and
        orthonormality) is checked before the first basis is installed: a refused call raises
        kvtrim.Error and leaves the cache as it was. On CUDA the bases are copied to the device per
        head through set_basis's path (synchronised: a setup step).

            profile = kvtrim.LowRankProfile.load("llama-8b.low_rank.json")
            caches = [kvtrim.Cache(press, kvtrim.LowRank(rank=32, source="profile"), "flat", shape, batch,
                                   capacity, layer=l, layers=profile.layers) for l in range(profile.layers)]
            for cache in caches:
                cache.load_low_rank_profile(profile)
        """
        function = "kvtrim.Cache.load_low_rank_profile"
        profile_type = getattr(_kvtrim, "LowRankProfile", None)
        if profile_type is None:
            raise _kvtrim.Error(f"{function}: argument 'profile': expected a kvtrim.LowRankProfile, got "
                                f"{type(profile).__name__} (this kvtrim was built without nlohmann-json: no profiles)")
        if not isinstance(profile, profile_type):
            raise _kvtrim.Error(f"{function}: argument 'profile': expected a kvtrim.LowRankProfile, got "
                                f"{type(profile).__name__}")
        if layer is None:
            layer = self.layer
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
            raise _kvtrim.Error(f"{function}: argument 'layer': expected a layer of the profile in "
                                f"[0, {profile.layers}), got {layer!r}")
        self._impl.load_low_rank_profile(profile, int(layer))

    def low_rank(self, b: int, h: int) -> dict:
        """LowRank storage of head (b, h): key_basis [D, r_k], value_basis [D, r_v] (float32) and the
        key/value coefficients [n, r] (fp16 values as float32) of the n tokens read(b, h) gives, in its
        order: read(b, h)'s keys are key_coefficients @ key_basisᵀ (post-RoPE keys; pre-RoPE keys are
        then rotated to their positions)."""
        return self._impl.low_rank(b, h)

    def check_status(self) -> None:
        """Raises kvtrim.Error for the first refusal a CUDA paged/flat cache recorded since the last check.

        Synchronises the stream of the cache's last call (then clears the record). Needed only with
        ``check="deferred"``; a no-op for CPU and contiguous caches, whose calls raise at once.
        """
        self._impl.check_status()

    # ---- what the cache holds ------------------------------------------------------------------

    def head_lengths(self) -> np.ndarray:
        """Tokens each (sequence, kv head) holds, flattened b·H_kv + h."""
        return self._impl.head_lengths()

    def kept(self) -> Tuple[np.ndarray, np.ndarray]:
        """The last compress's selection: (offsets [B·H_kv + 1] int64, tokens int32), CSR over flattened heads.

        From compress's kept-index output (compress_options); a CUDA cache keeps it in
        device memory and copies it back here (on the stream of the cache's last call).
        """
        return self._impl.kept()

    def positions(self) -> np.ndarray:
        """Every held token's position, head after head (CSR like kept(); lengths from head_lengths()).

        After compress(keys, ...) the kept tokens' indices into ``keys`` (the prefill starts at
        position 0); appended tokens continue from the next position of their head.
        """
        return self._impl.positions()

    def read(self, b: int, h: int) -> Tuple[np.ndarray, np.ndarray]:
        """The dequantized keys and values [n, D] (float32) head (b, h) holds.

        head_lengths, kept, positions, read and stats of a CUDA cache copy it back to
        the host (cudaMemcpyAsync on the stream of its last compress/append/attend,
        then a synchronisation of that stream): inspection, not a decode-step call.
        """
        return self._impl.read(b, h)

    def stats(self) -> dict:
        """Memory accounting (kvtrim::stats): kept tokens and bytes per head, totals, ratio to fp16, a table."""
        return self._impl.stats()

    @property
    def bytes(self) -> int:
        """Bytes the cache allocated."""
        return self._impl.bytes

    @property
    def name(self) -> str:
        return self._impl.name

    def __repr__(self) -> str:
        return f"kvtrim.Cache({self.name}, shape={self.shape}, batch={self._impl.batch}, bytes={self.bytes})"


def _describe(x: np.ndarray) -> str:
    """A NumPy array as kvtrim's messages describe arrays: dtype, shape and device."""
    return f"{x.dtype} [{', '.join(map(str, x.shape))}] on cpu"


def _numpy_input(function: str, argument: str, x: np.ndarray, widen: bool) -> np.ndarray:
    """A NumPy input that is not float32: float16/bfloat16 widened to float32 (``widen``: CPU caches), the
    other byte order swapped into a native copy, non-numbers refused; the rest (float64, int32, ...) goes on
    to the binding, which names what it expected."""
    if widen and x.dtype.name in ("float16", "bfloat16"):
        return x.astype(np.float32)  # exact; bfloat16 from ml_dtypes; any byte order
    if x.dtype.kind not in "biufc" and x.dtype.name != "bfloat16":
        raise _kvtrim.Error(f"{function}: argument '{argument}': expected float32, float16 or bfloat16 elements, "
                            f"got {_describe(x)}")
    if not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))  # exact: the same values in this host's byte order
    return x


def _numpy_output(function: str, argument: str, x: np.ndarray) -> None:
    """A NumPy array kvtrim writes into: refused unless writable and in this host's byte order (writing
    native floats into '>f4' memory would leave byte-swapped garbage; nanobind's own refusal names neither
    the call nor the argument)."""
    if not x.flags.writeable:
        raise _kvtrim.Error(f"{function}: argument '{argument}': expected a writable array (kvtrim writes the "
                            f"result into it), got a read-only {_describe(x)}")
    if not x.dtype.isnative:
        raise _kvtrim.Error(f"{function}: argument '{argument}': expected an array in this host's byte order "
                            f"(kvtrim writes native floats into it), got {_describe(x)}")
    if not x.flags.aligned:
        raise _kvtrim.Error(f"{function}: argument '{argument}': expected an array aligned to its elements "
                            f"(kvtrim writes whole floats into it), got an unaligned {_describe(x)}")


def _lengths_argument(function: str, lengths) -> list:
    """Prompt lengths as a list of int64 (ints, NumPy integers, a 1-D integer array); kvtrim checks the values."""
    try:
        if isinstance(lengths, np.ndarray):
            if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
                raise TypeError("lengths")
            lengths = lengths.tolist()
        values = []
        for x in lengths:
            if isinstance(x, bool):  # operator.index(True) is 1
                raise TypeError("lengths")
            values.append(_int64("lengths", operator.index(x)))
        return values
    except (TypeError, ValueError):
        raise _kvtrim.Error(f"{function}: argument 'lengths': expected one integer prompt length per sequence "
                            f"(a list or a 1-D integer array), got {lengths!r}") from None


def _int64(argument: str, value: int) -> int:
    if not -(2**63) <= value < 2**63:
        raise ValueError(argument)
    return value


def _size_argument(argument: str, value) -> int:
    """batch / capacity as an int64 (NumPy integers too), else kvtrim.Error (kvtrim checks the range)."""
    try:
        if isinstance(value, bool):
            raise TypeError(argument)
        return _int64(argument, operator.index(value))
    except (TypeError, ValueError):
        raise _kvtrim.Error(f"kvtrim.Cache: argument '{argument}': expected an integer (int64), got {value!r}") from None


# Settings fields under the names the presses and codecs take them by (the rest are the same).
_KNOB_ARGUMENTS = {"keep_tokens": "tokens", "recent_tokens": "recent", "recent_ratio": "recent",
                   "pyramid_window": "window", "key_group": "group", "fp8_key_scale": "key_scale",
                   "fp8_value_scale": "value_scale", "layered_sinks": "sinks", "layered_recent": "recent"}


class _Knobs:
    """The Settings a press and a codec fill (their ``_fill``), refusing in kvtrim's words what a field cannot
    hold — an int past int64 (``tokens=2**63``), a str for a number — where nanobind's TypeError names neither
    the call nor the argument. Reads go through to the Settings."""

    __slots__ = ("_settings",)

    def __init__(self, settings):
        object.__setattr__(self, "_settings", settings)

    def __getattr__(self, name):
        return getattr(self._settings, name)

    def __setattr__(self, name, value):
        try:
            setattr(self._settings, name, value)
        except TypeError:
            current = getattr(self._settings, name)
            expected = ("True or False" if isinstance(current, bool)
                        else "an integer in [-2^63, 2^63)" if isinstance(current, int)
                        else "a number" if isinstance(current, float)
                        else "a list of integers in [-2^63, 2^63)" if isinstance(current, list)
                        else "a string")
            raise _kvtrim.Error(f"kvtrim.Cache: argument '{_KNOB_ARGUMENTS.get(name, name)}': expected {expected}, "
                                f"got {value!r}") from None


def _int32(argument: str, value: int) -> int:
    if not -(2**31) <= value < 2**31:
        raise _kvtrim.Error(f"kvtrim.Cache.truncate: argument '{argument}': expected counts that fit in int32, got {value}")
    return value


def _host_float32(x, argument: str):
    """A host float32 array for set_basis (torch/CuPy tensors are copied to the host; bases are a setup step)."""
    library = _library(x)
    if library == "torch":
        x = x.detach().cpu().numpy()
    elif library == "cupy":
        x = x.get()
    elif type(x) is np.ndarray and x.dtype != np.float32:
        x = _numpy_input("kvtrim.Cache.set_basis", argument, x, widen=False)  # byte order; non-numbers refused
    return x


def _torch_half_types():
    import torch

    return (torch.float16, torch.bfloat16)
