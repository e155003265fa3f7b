"""The per-layer state machine shared by every method: one :class:`Store` per side, one layer API.

A layer is a key store plus a value store. Both follow KIVI's residual rules (arXiv 2402.02750, Alg. 1),
as two flush policies of one state machine:

* keys (:class:`BlockFlush`) collect in a full-precision residual; whenever it holds ``>= R`` tokens, its
  oldest ``floor(n / R) * R`` tokens are quantized as whole blocks (groups of ``G`` tokens) and leave it;
* values (:class:`WindowFlush`) keep exactly the last ``R`` tokens in full precision; older ones are
  quantized per token.

What a flush writes, and how attention reads it, is the method's :class:`Format` (one per side, in
``kvpack.methods.<name>``). Quantized history never changes again. The tokens flushed by the latest
``append`` stay visible in full precision to the attention of that same step (the reference code attends
before it flushes, and prefill attention is exact); ``dequantize()`` shows the stored state after the
flush. That copy is a view of buffers the layer already holds and is released by the next ``append``.

Every per-token or per-group tensor lives in a :class:`GrowBuffer` along axis 2, laid out for the fused
decode kernels of each method.
"""

from __future__ import annotations

import abc
import math

import torch

from .config import AUTO_CENTERING_RATIO, MIN_CENTERING_TOKENS, SCALE_DTYPES, MethodConfig
from .errors import CacheFileError
from .kernels import decode, tokens
from .primitives import random_rotation

__all__ = ["BlockFlush", "CompressedLayer", "Format", "GrowBuffer", "Store", "WindowFlush"]

_GROWTH = 1.5
#: ``attend`` with at least this many query rows (prefill, chunked prefill) dequantizes the store once and
#: runs torch's fused SDPA: the dequantization is O(T) against the O(T_q * T) attention, and SDPA never
#: builds the (T_q, T) score matrix. Decode (1 row) and short speculative drafts read the packed codes.
SDPA_MIN_QUERIES = 16
#: Appends of at most this many tokens (decode steps) are checked and written by one C++ call.
APPEND_FAST_TOKENS = 64
#: Seed of the rotation of layers whose config sets ``rotate`` (layer i's depends on (seed, i, head_dim) only).
ROTATION_SEED = 0x5EED


class GrowBuffer:
    """A tensor that grows (amortized O(1)) and drops from the front along axis 2.

    ``view()`` is ``(B, H, length, ...)``; storage is ``(B, H, capacity, ...)``.
    """

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.start = 0
        self.length = 0

    def view(self) -> torch.Tensor:
        if self.data is None:
            raise RuntimeError("GrowBuffer is empty and has no shape yet")
        return self.data[:, :, self.start : self.start + self.length]

    def append(self, x: torch.Tensor) -> None:
        end = self.reserve(x, x.shape[2])
        self.data[:, :, end : end + x.shape[2]] = x
        self.length += x.shape[2]

    def free_slot(self, n: int) -> int | None:
        """The index where ``n`` more slots go if they fit without moving anything, else None."""
        if self.data is None:
            return None
        end = self.start + self.length
        return end if end + n <= self.data.shape[2] else None

    def reserve(self, x: torch.Tensor, n: int) -> int:
        """Make room for ``n`` more slots shaped like ``x``'s (allocating on first use) and return the index
        of the first; the caller writes them and adds ``n`` to :attr:`length`. Live slots keep their values."""
        if self.data is None:
            capacity = max(n, 16)
            self.data = x.new_empty(x.shape[:2] + (capacity,) + x.shape[3:])
        end = self.start + self.length
        if end + n > self.data.shape[2]:
            if self.start and self.length + n <= self.data.shape[2] and self.start >= self.length:
                # Compact in place: live data moves to the front (regions do not overlap).
                self.data[:, :, : self.length] = self.data[:, :, self.start : end]
            else:
                capacity = max(self.length + n, int(self.data.shape[2] * _GROWTH) + 1)
                grown = self.data.new_empty(self.data.shape[:2] + (capacity,) + self.data.shape[3:])
                grown[:, :, : self.length] = self.data[:, :, self.start : end]
                self.data = grown
            self.start = 0
            end = self.length
        return end

    def drop_front(self, n: int, keep_capacity: int | None = None) -> tuple[torch.Tensor, int] | None:
        """Drop the ``n`` oldest slots.

        With ``keep_capacity``, storage of more than twice that many slots (a prompt-sized first append)
        is replaced by a copy of the live slots with ``keep_capacity`` slots of room. The old storage is not
        modified (views of it stay valid); it is returned as ``(data, start)`` for :meth:`undrop_front`,
        else None.
        """
        self.start += n
        self.length -= n
        if keep_capacity is None or self.data.shape[2] <= 2 * max(keep_capacity, self.length):
            return None
        replaced = (self.data, self.start)
        capacity = max(keep_capacity, self.length)
        live = self.view()
        self.data = live.new_empty(live.shape[:2] + (capacity,) + live.shape[3:])
        self.data[:, :, : self.length] = live
        self.start = 0
        return replaced

    def undrop_front(self, n: int, replaced: tuple[torch.Tensor, int] | None = None) -> None:
        """Undo ``drop_front(n)`` (given what it returned): exact as long as nothing was appended since."""
        if replaced is not None:
            self.data, self.start = replaced
        self.start -= n
        self.length += n

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def apply(self, fn) -> None:
        """Replace the storage by ``fn(view)`` (batch reordering / repetition)."""
        if self.data is not None:
            self.data = fn(self.view()).contiguous()
            self.start = 0

    def nbytes(self, allocated: bool = False) -> int:
        if self.data is None:
            return 0
        if allocated:
            return self.data.numel() * self.data.element_size()
        per_slot = self.data[:, :, :1].numel() * self.data.element_size()
        return per_slot * self.length


def _check_values(tensors: dict[str, torch.Tensor], nonnegative: tuple[str, ...]) -> str | None:
    """Why ``tensors`` hold values a store never writes (NaN/Inf, a negative scale), or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN/Inf values"
        if name in nonnegative and tensor.numel() and bool((tensor < 0).any()):
            return f"{name} holds negative values (the store writes only scales/norms >= 0)"
    return None


class BlockFlush:
    """Keys (KIVI): whenever the fp part holds ``>= R`` tokens, its oldest ``floor(n / R) * R`` are quantized."""

    def __init__(self, residual_length: int) -> None:
        self.residual_length = residual_length

    def count(self, fp_tokens: int) -> int:
        return (fp_tokens // self.residual_length) * self.residual_length


class WindowFlush:
    """Values (KIVI): exactly the last ``R`` tokens stay in fp; older ones are quantized as they leave."""

    def __init__(self, residual_length: int) -> None:
        self.residual_length = residual_length

    def count(self, fp_tokens: int) -> int:
        return max(fp_tokens - self.residual_length, 0)


class Format(abc.ABC):
    """A method's quantized format for one side (keys or values): what a flush writes and how it is read.

    Quantized data is a dict of named tensors, each ``(B, H, rows, ...)``; one row holds ``unit`` tokens
    (a key group of G tokens, or one value token). Attention reads rows through :meth:`scores` (key formats)
    or :meth:`weighted_sum` (value formats).
    """

    #: Tokens per quantized row along axis 2.
    unit: int = 1
    #: Row tensors the format only ever writes >= 0 (scales, norms): checked when a state is loaded.
    nonnegative: tuple[str, ...] = ()

    def build(self, head_dim: int) -> None:  # noqa: B027 - an optional hook, empty by default
        """Hook for head_dim-dependent state (rotations, sketches): called once, before the first tokens."""

    @abc.abstractmethod
    def quantize(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x`` (B, H, n * unit, D) fp -> named tensors, each (B, H, n, ...)."""

    def quantize_into(self, x: torch.Tensor, rows: dict[str, GrowBuffer]) -> bool:
        """Optionally :meth:`quantize` straight into the row buffers' free slots, advancing their lengths
        (the decode path's one-token value flush). False, with nothing stored, where it does not: the store
        then calls :meth:`quantize` and appends its tensors."""
        return False

    @abc.abstractmethod
    def dequantize(self, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named tensors (B, H, n, ...) -> (B, H, n * unit, D) float32 reconstruction."""

    @abc.abstractmethod
    def spec(self, batch: int, heads: int, dim: int, dtype: torch.dtype, n: int) -> dict[str, tuple]:
        """What :meth:`quantize` writes for ``n`` rows: name -> (shape, dtype), for load validation."""

    def check(self, rows: dict[str, torch.Tensor], dim: int) -> str | None:
        """Why loaded rows (shapes already checked) are not something this format writes, or None.

        The base rule: no NaN/Inf in floating tensors (the store refuses them on append), and the tensors
        named in :attr:`nonnegative` are >= 0.
        """
        return _check_values(rows, self.nonnegative)

    def scores(self, query: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Key formats: ``query`` (B, H, M, D) float32 -> (B, H, M, n * unit) float32 estimates of q.k."""
        raise NotImplementedError(f"{type(self).__name__} is not a key format")

    def weighted_sum(self, weights: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """Value formats: ``weights`` (B, H, M, n) float32 -> (B, H, M, D) float32 over the quantized tokens."""
        raise NotImplementedError(f"{type(self).__name__} is not a value format")

    def nbytes(self) -> int:
        """Bytes of fixed per-layer state (e.g. QJL's sketch), counted by the layer's ``nbytes``."""
        return 0


class Store:
    """One side of a layer: an fp part flushed to quantized rows by ``policy``, in ``format``.

    Appending writes only past the live fp tokens and past the live rows, and a flush only moves the fp
    part's start, so :meth:`undo_append` restores every byte. The fp copy of the tokens flushed by the last
    append (``pending``) is a view of the fp storage, valid until the next append.

    Args:
        format: the method's :class:`Format` for this side.
        policy: :class:`BlockFlush` (keys) or :class:`WindowFlush` (values).
        names: (quantized, fp) names used in saved states: ("groups", "residual") or ("tokens", "window").
    """

    def __init__(self, format: Format, policy, names: tuple[str, str]) -> None:
        self.format = format
        self.policy = policy
        self.names = names
        self.rows: dict[str, GrowBuffer] = {}
        self.fp = GrowBuffer()
        self.pending: torch.Tensor | None = None
        self.num_rows = 0
        self._undo: tuple | None = None  # (fp length before, tokens flushed, replaced fp storage) of the last append

    @property
    def unit(self) -> int:
        return self.format.unit

    @property
    def num_quantized(self) -> int:
        """Tokens held quantized."""
        return self.num_rows * self.format.unit

    @property
    def num_tokens(self) -> int:
        return self.num_quantized + self.fp.length

    def append(self, x: torch.Tensor) -> None:
        self.pending = None  # before fp.append: a compaction may overwrite what the view reads
        before = self.fp.length
        self.fp.append(x)
        self.flush(before)

    def flush(self, before: int) -> None:
        """The rest of :meth:`append` once the fp part has grown from ``before`` tokens (written by the caller
        through ``fp.reserve``): quantize what the policy flushes, keep what :meth:`undo_append` needs."""
        self.pending = None
        n_flush = self.policy.count(self.fp.length)
        replaced = None
        if n_flush:
            flushed = self.fp.view()[:, :, :n_flush]
            if not (self.rows and self.format.quantize_into(flushed, self.rows)):
                try:
                    quantized = self.format.quantize(flushed)
                except Exception:
                    self.fp.truncate(before)  # a failed flush (e.g. scale overflow) stores nothing
                    raise
                for name, tensor in quantized.items():
                    self.rows.setdefault(name, GrowBuffer()).append(tensor)
            self.num_rows += n_flush // self.format.unit
            # A prompt leaves <= R tokens in a prompt-sized buffer: shrink it (room for in-place compaction).
            replaced = self.fp.drop_front(n_flush, keep_capacity=2 * self.policy.residual_length + 16)
            self.pending = flushed  # a live view: neither compaction nor shrinking touches it before the next append
        self._undo = (before, n_flush, replaced)

    def undo_append(self) -> None:
        """Exactly undo the last :meth:`append` (the layer calls this when the other side then fails)."""
        if self._undo is None:
            raise RuntimeError("undo_append: no append to undo")
        before, n_flush, replaced = self._undo
        self._undo = self.pending = None
        if n_flush:
            self.num_rows -= n_flush // self.format.unit
            for buf in self.rows.values():
                buf.truncate(self.num_rows)
            self.rows = {name: buf for name, buf in self.rows.items() if buf.length}  # as before a first flush
            self.fp.undrop_front(n_flush, replaced)
        self.fp.truncate(before)

    def drop_front_tokens(self, n: int) -> None:
        """Drop the ``n`` oldest tokens (a sliding-window layer's tokens that left the window): whole rows first,
        then the front of the fp part once no row is left. ``n`` ends on a row boundary (the layer's unit)."""
        self.pending = self._undo = None
        from_rows = min(n, self.num_quantized)
        if from_rows % self.unit:
            raise RuntimeError(f"dropping {n} tokens would cut a row of {self.unit} tokens")
        for buf in self.rows.values():
            buf.drop_front(from_rows // self.unit)
        self.num_rows -= from_rows // self.unit
        if n > from_rows:
            self.fp.drop_front(n - from_rows)

    def row_views(self, n: int | None = None) -> dict[str, torch.Tensor]:
        n = self.num_rows if n is None else n
        return {name: buf.data[:, :, buf.start : buf.start + n] for name, buf in self.rows.items()}  # one slice each

    def split(self) -> tuple[int, list[torch.Tensor]]:
        """Quantized rows attention reads, and the fp tensors that follow them (pending, fp part)."""
        fp = [] if self.fp.length == 0 else [self.fp.view()]
        if self.pending is None:
            return self.num_rows, fp
        return self.num_rows - self.pending.shape[2] // self.format.unit, [self.pending, *fp]

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """q.k for every attended key: ``query`` (B, H, M, D) float32 -> (B, H, M, T) float32."""
        n_rows, fp = self.split()
        parts = [self.format.scores(query, self.row_views(n_rows))] if n_rows else []
        parts += [query @ k.float().transpose(-1, -2) for k in fp]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def materialize(self) -> torch.Tensor:
        """What attention reads this step (pending tokens in fp), (B, H, T, D) float32."""
        n_rows, fp = self.split()
        parts = [self.format.dequantize(self.row_views(n_rows))] if n_rows else []
        return torch.cat(parts + [x.float() for x in fp], dim=2)

    def dequantize(self) -> torch.Tensor:
        """The stored state, (B, H, T, D) float32."""
        parts = [self.format.dequantize(self.row_views())] if self.num_rows else []
        if self.fp.length:
            parts.append(self.fp.view().float())
        return torch.cat(parts, dim=2)

    def crop(self, num_tokens: int, dtype: torch.dtype) -> None:
        """Keep the first ``num_tokens`` tokens.

        Whole rows past the cut are dropped; the surviving tokens of a row cut in the middle (a key group)
        return to the fp part as their reconstruction in ``dtype`` (quantized again when next flushed).
        """
        self.pending = self._undo = None
        if num_tokens >= self.num_quantized:
            self.fp.truncate(num_tokens - self.num_quantized)
            return
        unit = self.format.unit
        keep, tail = divmod(num_tokens, unit)
        tail_tokens = None
        if tail:
            views = {name: v[:, :, keep : keep + 1] for name, v in self.row_views().items()}
            tail_tokens = self.format.dequantize(views)[:, :, :tail]
        for buf in self.rows.values():
            buf.truncate(keep)
        self.num_rows = keep
        self.fp = GrowBuffer()
        if tail_tokens is not None:
            self.fp.append(tail_tokens.to(dtype))

    def named_buffers(self) -> dict[str, GrowBuffer]:
        quantized, fp = self.names
        return {**{f"{quantized}.{name}": buf for name, buf in self.rows.items()}, fp: self.fp}

    def buffers(self) -> list[GrowBuffer]:
        return list(self.named_buffers().values())

    def nbytes(self, allocated: bool = False) -> int:
        return sum(b.nbytes(allocated) for b in self.buffers()) + self.format.nbytes()

    def restore(self, tensors: dict[str, torch.Tensor], num_rows: int) -> None:
        """Load :meth:`named_buffers` contents saved by :meth:`CompressedLayer.state_dict` (validated)."""
        self.pending = self._undo = None
        quantized, fp = self.names
        for name, tensor in tensors.items():
            buf = GrowBuffer()
            buf.append(tensor)
            if name == fp:
                self.fp = buf
            else:
                self.rows[name.removeprefix(quantized + ".")] = buf
        self.num_rows = num_rows


def _same_config(saved, config: MethodConfig) -> bool:
    """A saved config dict describes ``config`` (fields added since, absent from older files, at defaults)."""
    if not isinstance(saved, dict):
        return False
    try:
        return type(config).from_dict(saved) == config
    except (TypeError, ValueError):
        return False


def _is_count(x) -> bool:
    """A non-negative Python int (bool is not)."""
    return type(x) is int and x >= 0


def _last_columns(attention_mask, total: int) -> torch.Tensor:
    """The mask's columns for the ``total`` stored keys: bool as given, additive float as float32.

    Raises:
        TypeError: not a tensor, or neither bool nor floating: an integer 0/1 mask is ambiguous (added to the
            scores it would mask nothing), so it is refused rather than guessed.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        raise TypeError(
            f"attention_mask must be bool (True = attend) or an additive float mask, got {attention_mask.dtype}; "
            "convert a 0/1 integer mask with mask.bool()"
        )
    mask = attention_mask[..., -total:]
    return mask if mask.dtype == torch.bool else mask.float()


def _mask(attention_mask, t_q: int, total: int, device, whole_causal: bool):
    """The mask rule of :meth:`CompressedLayer.attend`, for both of its paths.

    A given mask: its last ``total`` columns (bool, or additive float32). Without one: None for one query
    (it sees every stored token), else causal over the last ``t_q`` positions, as a bool (T_q, T) mask, or
    ``"causal"`` when the queries are all the tokens and ``whole_causal`` (SDPA's own ``is_causal``).

    Raises:
        ValueError: more causal queries than stored tokens.
        TypeError: a mask that is neither bool nor floating.
    """
    if attention_mask is not None:
        return _last_columns(attention_mask, total)
    if t_q == 1:
        return None
    if t_q > total:
        raise ValueError(f"{t_q} queries but only {total} tokens stored")
    if t_q == total and whole_causal:
        return "causal"
    return torch.ones(t_q, total, dtype=torch.bool, device=device).tril(total - t_q)  # the last t_q positions


class CompressedLayer:
    """One attention layer's compressed KV store: the public per-layer API of every method.

    A method subclasses it and implements :meth:`formats`; keys and values are two :class:`Store` objects
    with KIVI's flush rules (keys in blocks of R, values a window of R), built here.
    """

    config: MethodConfig
    keys: Store
    values: Store
    #: The method's fused decode kernel (a :class:`kvpack.kernels.Kernel` taking :meth:`_decode_args`), or None.
    decode_op = None

    def __init__(
        self,
        config: MethodConfig,
        layer_idx: int = 0,
        *,
        sliding_window: int | None = None,
        drop_unit: int | None = None,
    ) -> None:
        self.config = config
        self.layer_idx = layer_idx
        key_format, value_format = self.formats()
        residual_length = config.residual_length
        self.keys = Store(key_format, BlockFlush(residual_length), ("groups", "residual"))
        self.values = Store(value_format, WindowFlush(residual_length), ("tokens", "window"))
        self._shape: tuple[int, int, int] | None = None  # (B, H_kv, D)
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None
        self._empty_rows: dict[tuple, dict[str, torch.Tensor]] = {}  # what _rows reads before the first flush
        # The first ``sink_tokens`` tokens, never quantized: (keys, values), each (B, H_kv, <= S, D) in the model
        # dtype, or None. Attention reads them as the last fp chunk (the order of the tokens does not matter to
        # softmax once the mask's columns follow them: see _sinks_last).
        self._sinks: tuple[torch.Tensor, torch.Tensor] | None = None
        # A sliding-window layer (transformers' semantics: the query at position p reads the keys at positions
        # p - W + 1 .. p) drops, at each append, the oldest whole units of ``drop_unit`` tokens that no later
        # query reads; ``_dropped`` tokens are gone from the front.
        self.sliding_window = sliding_window
        self.drop_unit = self._check_sliding(sliding_window, drop_unit)
        self._dropped = 0
        # key_centering: (1, H_kv, 1, D) float32 subtracted from every key before it is stored (zero rows for the
        # heads "auto" leaves alone), or None. Scores of a query then all move by q.mu, which softmax ignores.
        self._key_offset: torch.Tensor | None = None
        # ``rotate`` (KIVI): a (D, D) orthogonal R; the stores hold k R^T and v R^T, the query is rotated before
        # the decode op and its output rotated back after (q.k = (R q).(R k)), the readers rotate back.
        self._rotation: torch.Tensor | None = None

    def _check_sliding(self, sliding_window, drop_unit) -> int | None:
        """Validate the sliding-window arguments; returns the drop unit (None for a full-attention layer)."""
        if sliding_window is None:
            if drop_unit is not None:
                raise ValueError("drop_unit is only for a sliding-window layer (give sliding_window too)")
            return None
        if type(sliding_window) is not int or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}")
        if getattr(self.config, "sink_tokens", 0):
            raise ValueError(
                "sink_tokens must be 0 in a sliding-window layer (the first tokens leave the window like any other)"
            )
        unit = self.row_unit
        if drop_unit is None:
            return unit
        if type(drop_unit) is not int or drop_unit < 1 or drop_unit % unit:
            raise ValueError(
                f"drop_unit must be a positive multiple of {unit} (this config's row sizes), got {drop_unit!r}"
            )
        return drop_unit

    # --- input checks ---------------------------------------------------------------------------------
    def _check(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name, x in (("keys", keys), ("values", values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.layout != torch.strided:
                raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
            if x.dim() != 4:
                raise ValueError(f"{name} must have shape (batch, kv_heads, tokens, head_dim), got {tuple(x.shape)}")
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if keys.shape != values.shape:
            raise ValueError(
                f"keys and values must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if keys.dtype != values.dtype:
            raise TypeError(f"keys and values must share a dtype, got {keys.dtype} and {values.dtype}")
        if keys.device != values.device:
            raise ValueError(f"keys and values must be on one device, got {keys.device} and {values.device}")
        if self._device is not None and keys.device != self._device:
            raise ValueError(f"append expects tensors on {self._device} as before, got {keys.device}")
        batch, heads, _, dim = keys.shape
        if self._shape is not None and (batch, heads, dim) != self._shape:
            raise ValueError(
                f"append expects (batch, kv_heads, head_dim) = {self._shape} as before, got {(batch, heads, dim)}"
            )
        if self._dtype is not None and keys.dtype != self._dtype:
            raise TypeError(f"append expects dtype {self._dtype} as before, got {keys.dtype}")
        if self._shape is None:
            self.config.check_head_dim(dim)

    def _check_finite(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.config.check_finite:
            # one host read for both counts (on a GPU each read waits for the device)
            bad = torch.stack([(~torch.isfinite(keys)).sum(), (~torch.isfinite(values)).sum()]).tolist()
            for name, count in zip(("keys", "values"), bad):
                if count:
                    raise ValueError(f"{name} contain {count} NaN/Inf values; nothing was stored")

    def formats(self) -> tuple[Format, Format]:
        """The method's (key format, value format) for this layer's config and layer_idx."""
        raise NotImplementedError

    def _build(self, head_dim: int) -> None:
        """Build head_dim-dependent state (each format's :meth:`Format.build`), before the first tokens."""
        self.keys.format.build(head_dim)
        self.values.format.build(head_dim)
        if getattr(self.config, "rotate", False):
            self._rotation = random_rotation(head_dim, ROTATION_SEED, self.layer_idx)

    # --- public API ---------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store new tokens: ``keys``, ``values`` (B, H_kv, T, D), T >= 0 (T = 0 changes nothing)."""
        self._check(keys, values)
        if keys.shape[2] == 0:
            return
        first = self._shape is None
        if first:
            self._build(keys.shape[3])
            self._shape = (keys.shape[0], keys.shape[1], keys.shape[3])
            self._dtype, self._device = keys.dtype, keys.device
        # Tokens that left the sliding window go first: no query from here on reads them (even if this append is
        # refused), and the mask transformers built for this step (get_mask_sizes) already leaves them out.
        self._drop(self.pending_drop())
        given = keys, values
        if first:
            self._key_offset = self._centering(keys)
        fp_dtype = self.config.fp_dtype(keys.dtype)
        # Centering and rotation in float32, then one cast to what the fp parts hold (residual_dtype).
        if self._key_offset is not None:
            keys = keys.float() - self._key_offset
        if self._rotation is not None:
            rotation = self._rotation_on(keys.device)
            keys, values = keys.float() @ rotation.T, values.float() @ rotation.T
        keys, values = keys.to(fp_dtype), values.to(fp_dtype)
        try:
            need = getattr(self.config, "sink_tokens", 0) - self.num_sinks
            if need > 0:  # the first tokens of the layer: into the sinks, the rest (if any) into the stores
                self._check_finite(keys, values)
                sinks = self._grown_sinks(keys[:, :, :need], values[:, :, :need])
                if keys.shape[2] > need:
                    self._store(keys[:, :, need:], values[:, :, need:])
                self._sinks = sinks  # only once the stores took their part
            elif not self._append_fast(keys, values):
                self._check_finite(keys, values)
                self._store(keys, values)
        except Exception as err:
            if first:
                self._shape = self._dtype = self._device = self._key_offset = None
            converted = keys is not given[0] or values is not given[1]
            if isinstance(err, ValueError) and converted and "NaN/Inf" in str(err) and self.config.check_finite:
                self._check_finite(*given)  # the input's own NaN/Inf, else the conversion overflowed:
                raise ValueError(
                    f"keys or values exceed the range of {fp_dtype} (residual_dtype={self.config.residual_dtype!r}); "
                    "nothing was stored. 'bfloat16' holds any float32 value"
                ) from None
            raise

    def _centering(self, keys: torch.Tensor) -> torch.Tensor | None:
        """The key offset ``key_centering`` takes from a layer's first append ``keys`` (B, H, T, D): the mean of
        its tokens after the sinks over batch and tokens, per (head, channel); None when off, when too few
        tokens come, or when "auto" centers no head."""
        mode = getattr(self.config, "key_centering", "off")
        tokens = keys[:, :, getattr(self.config, "sink_tokens", 0) :].float()
        if mode == "off" or tokens.shape[2] < MIN_CENTERING_TOKENS or not bool(torch.isfinite(tokens).all()):
            return None  # (non-finite keys are refused right after, with the usual message)
        mean = tokens.mean(dim=(0, 2), keepdim=True)  # (1, H, 1, D)
        if mode == "auto":
            spread = (tokens - mean).square().sum(-1).mean(dim=(0, 2)).sqrt()  # (H,): RMS distance to the mean
            centered = mean.flatten(2).norm(dim=-1).squeeze(0) > AUTO_CENTERING_RATIO * spread
            if not bool(centered.any()):
                return None
            mean = mean * centered.view(1, -1, 1, 1)
        return mean

    @property
    def key_offset(self) -> torch.Tensor | None:
        """The (1, H_kv, 1, D) float32 offset subtracted from every stored key (``key_centering``), or None."""
        return self._key_offset

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append checked tokens to both stores, or to neither."""
        self.keys.append(keys)  # a failing store leaves itself unchanged
        try:
            self.values.append(values)
        except Exception:
            self.keys.undo_append()  # keys and values stay in step: nothing of this call is stored
            raise

    @property
    def num_sinks(self) -> int:
        """Tokens held in full precision as attention sinks (at most ``config.sink_tokens``)."""
        return 0 if self._sinks is None else self._sinks[0].shape[2]

    def _grown_sinks(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sinks with ``keys``/``values`` appended, as new tensors (the caller commits them)."""
        if self._sinks is None:
            return keys.clone(), values.clone()  # copies: the caller's tensors may change after the call
        return torch.cat([self._sinks[0], keys], dim=2), torch.cat([self._sinks[1], values], dim=2)

    def _sinks_last(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A mask over the tokens in position order (sinks first) -> the order attention reads them in (the
        stores' tokens, then the sinks)."""
        n = self.num_sinks
        if mask is None or n == 0:
            return mask
        return torch.cat([mask[..., n:], mask[..., :n]], dim=-1)

    def _with_sinks(self, parts: list[torch.Tensor], side: int) -> list[torch.Tensor]:
        """Position-ordered tensors of one side (keys 0, values 1) with the sinks in front."""
        return parts if self._sinks is None else [self._sinks[side], *parts]

    def _append_fast(self, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """:meth:`append` with the finite check and both fp writes in one C++ call (kernels.tokens), for
        appends of at most ``APPEND_FAST_TOKENS`` tokens that fit the fp buffers' free slots as they are
        (nothing moves before the check, so a refused append leaves every view valid); False (nothing done)
        where it cannot run."""
        n = keys.shape[2]
        if n > APPEND_FAST_TOKENS:
            return False
        key_fp, value_fp = self.keys.fp, self.values.fp
        key_end, value_end = key_fp.free_slot(n), value_fp.free_slot(n)
        if key_end is None or value_end is None:  # growth or compaction first: the torch path
            return False
        bad = tokens.append_tokens(keys, values, key_fp.data, key_end, value_fp.data, value_end,
                                   self.config.check_finite)  # fmt: skip
        if bad is None:
            return False
        if bad != (0, 0):
            name, count = ("keys", bad[0]) if bad[0] else ("values", bad[1])
            raise ValueError(f"{name} contain {count} NaN/Inf values; nothing was stored")
        keys_before, values_before = key_fp.length, value_fp.length
        key_fp.length += n
        value_fp.length += n
        try:
            self.keys.flush(keys_before)
        except Exception:
            value_fp.truncate(values_before)
            raise
        try:
            self.values.flush(values_before)
        except Exception:
            self.keys.undo_append()
            raise
        return True

    @property
    def num_tokens(self) -> int:
        """Tokens held (a sliding-window layer's after what it dropped: see :attr:`seq_length`)."""
        return self.num_sinks + self.keys.num_tokens

    @property
    def row_unit(self) -> int:
        """Tokens in a whole number of rows of both sides (a sliding-window layer drops multiples of it)."""
        return math.lcm(self.keys.unit, self.values.unit)

    @property
    def num_dropped(self) -> int:
        """Tokens a sliding-window layer dropped from the front (0 for a full-attention layer)."""
        return self._dropped

    @property
    def seq_length(self) -> int:
        """Tokens appended (less those cropped): the position of the next token. The held tokens are the last
        :attr:`num_tokens` of them."""
        return self._dropped + self.num_tokens

    def pending_drop(self) -> int:
        """Tokens the next :meth:`append` drops first: the oldest whole ``drop_unit`` units that no query from
        position :attr:`seq_length` on reads (it reads positions > seq_length - sliding_window). 0 for a
        full-attention layer."""
        if self.sliding_window is None:
            return 0
        unread = self.seq_length - self.sliding_window + 1 - self._dropped  # the held tokens no query reads
        return max(unread, 0) // self.drop_unit * self.drop_unit

    def _drop(self, n: int) -> None:
        if n:
            self.keys.drop_front_tokens(n)
            self.values.drop_front_tokens(n)
            self._dropped += n

    def _window_mask(self, t_q: int, device) -> torch.Tensor | None:
        """A sliding-window layer's default mask when some held key is out of some query's window: bool
        (t_q, T), True where query i (at position seq_length - t_q + i) reads key j (at num_dropped + j)."""
        if self.sliding_window is None or self.num_tokens <= self.sliding_window:
            return None  # every held key is within the window of each query that may read it: causal suffices
        total = self.num_tokens
        q = torch.arange(total - t_q, total, device=device)[:, None]
        k = torch.arange(total, device=device)[None, :]
        return (k <= q) & (k > q - self.sliding_window)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the appended keys/values (None before the first append)."""
        return self._dtype

    @property
    def fp_dtype(self) -> torch.dtype | None:
        """The dtype the fp parts (residual, window, sinks) are held in: :attr:`dtype` unless the config's
        ``residual_dtype`` holds a float32 model's in 16 bits (None before the first append)."""
        return None if self._dtype is None else self.config.fp_dtype(self._dtype)

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """``(batch, kv_heads, head_dim)`` of the stored tokens (None before the first append)."""
        return self._shape

    @property
    def batch_size(self) -> int | None:
        return None if self._shape is None else self._shape[0]

    @property
    def head_dim(self) -> int | None:
        return None if self._shape is None else self._shape[2]

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored state: (k_hat, v_hat), each (B, H_kv, T_total, D) in the input dtype."""
        self._require_tokens()
        return self._sides(self.keys.dequantize, self.values.dequantize)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``attend`` reads this step, dequantized: like :meth:`dequantize`, but the tokens flushed
        by the latest ``append`` appear in full precision (the compat attention path uses this)."""
        self._require_tokens()
        return self._sides(self.keys.materialize, self.values.materialize)

    def _sides(self, keys, values) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sides' (B, H_kv, T, D) tensors in the model dtype, sinks first: ``keys()`` / ``values()`` give
        the stores' part."""
        # Stored rotated or centered: undo it in float32, then one cast to the model dtype.
        dtype = torch.float32 if self._rotation is not None or self._key_offset is not None else self._dtype
        out = []
        for side, read in enumerate((keys, values)):
            parts = [read().to(dtype)] if self.keys.num_tokens else []
            parts = [x.to(dtype) for x in self._with_sinks(parts, side)]
            out.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
        if self._rotation is not None:  # the stores hold rotated keys and values
            rotation = self._rotation_on(out[0].device)
            out = [x @ rotation for x in out]
        if self._key_offset is not None:  # the stored keys are centered: these are the keys themselves
            out[0] = out[0] + self._key_offset
        return out[0].to(self._dtype), out[1].to(self._dtype)

    def _rotation_on(self, device) -> torch.Tensor:
        if self._rotation.device != device:
            self._rotation = self._rotation.to(device)
        return self._rotation

    def _check_query(self, query: torch.Tensor) -> None:
        """Raise unless ``query`` (B, H_q, T_q, D) fits the store: same batch and head_dim, H_q % H_kv == 0."""
        self._require_tokens()
        if query.dim() != 4:
            raise ValueError(f"query must have shape (batch, q_heads, tokens, head_dim), got {tuple(query.shape)}")
        batch, heads_q, t_q, dim = query.shape
        b, heads_kv, d = self._shape
        if batch != b or dim != d or heads_q % heads_kv:
            raise ValueError(
                f"query shape {tuple(query.shape)} does not fit the store (batch {b}, {heads_kv} kv heads, "
                f"head_dim {d}); q_heads must be a multiple of kv_heads"
            )

    def _group_query(self, query: torch.Tensor) -> torch.Tensor:
        """(B, H_q, T_q, D), already checked -> (B, H_kv, rep * T_q, D) float32; query head h reads kv head
        h // rep."""
        batch, heads_q, t_q, dim = query.shape
        heads_kv = self._shape[1]
        return query.float().reshape(batch, heads_kv, (heads_q // heads_kv) * t_q, dim)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Unscaled q.k over the attended keys: (B, H_q, T_q, D) -> (B, H_q, T_q, T_total) float32."""
        self._check_query(query)
        batch, heads_q, t_q, _ = query.shape
        grouped = self._group_query(query)
        stored = grouped if self._rotation is None else grouped @ self._rotation_on(grouped.device).T
        parts = [self.keys.scores(stored)] if self.keys.num_tokens else []
        if self._sinks is not None:
            parts.insert(0, stored @ self._sinks[0].float().transpose(-1, -2))
        scores = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        if self._key_offset is not None:  # q.k = q.(k - mu) + q.mu
            scores = scores + grouped @ self._key_offset.transpose(-1, -2)
        return scores.reshape(batch, heads_q, t_q, -1)

    def attend(
        self,
        query: torch.Tensor,
        scale: float | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``query`` over the store, reading the packed codes.

        Args:
            query: (B, H_q, T_q, D); H_q a multiple of H_kv. Query i sits at position T_total - T_q + i.
            scale: softmax scale, default ``D ** -0.5``.
            attention_mask: optional, broadcastable to (B, H_q, T_q, T_total); bool (True = attend) or
                additive float. Replaces the default causal mask over the last T_q tokens.

        Returns:
            (B, H_q, T_q, D) in the query's dtype. Rows with nothing to attend to are zero.

        Raises:
            ValueError: the query does not fit the store (batch, head_dim, head ratio), or more causal queries
                than stored tokens.
            TypeError: a mask that is neither bool nor floating (an integer 0/1 mask is refused, not guessed).
        """
        self._check_query(query)
        batch, heads_q, t_q, dim = query.shape
        scale = dim**-0.5 if scale is None else scale
        if attention_mask is None:
            attention_mask = self._window_mask(t_q, query.device)
        if t_q >= SDPA_MIN_QUERIES:
            return self._attend_materialized(query, scale, attention_mask)
        mask = self._sinks_last(self._grouped_mask(attention_mask, query, self.num_tokens))
        grouped = self._group_query(query)
        if self._rotation is None:
            out = self._decode(grouped, mask, scale)  # (B, H_kv, rep * T_q, D) float32
        else:  # the stores hold rotated keys and values: rotate the query in, the output back
            rotation = self._rotation_on(grouped.device)
            out = self._decode((grouped @ rotation.T).contiguous(), mask, scale) @ rotation
        return out.reshape(batch, heads_q, t_q, dim).to(query.dtype)

    def _grouped_mask(self, attention_mask, query: torch.Tensor, total: int) -> torch.Tensor | None:
        """:func:`_mask` for the packed path: None, or an additive float32 (B, H_kv, rep * T_q, T) view whose
        row order is the grouped query's."""
        batch, heads_q, t_q, _ = query.shape
        mask = _mask(attention_mask, t_q, total, query.device, whole_causal=False)
        if mask is None:
            return None
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
        try:
            mask = mask.expand(batch, heads_q, t_q, total)
        except RuntimeError:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape) if attention_mask is not None else None} "
                f"does not broadcast to (batch, q_heads, queries, tokens) = {(batch, heads_q, t_q, total)}"
            ) from None
        heads_kv = self._shape[1]
        return mask.reshape(batch, heads_kv, (heads_q // heads_kv) * t_q, total)

    def _rows(self, store: Store) -> tuple[int, dict[str, torch.Tensor], list[torch.Tensor]]:
        """What attention reads of one side: (n, row tensors, the fp tensors after them), where the first ``n``
        rows of each row tensor are read: the rows' storage itself (its capacity slack included, no slicing
        per step), or empty tensors of the format's shapes before the first flush."""
        n_rows, fp = store.split()
        if self._sinks is not None:
            fp = [*fp, self._sinks[0 if store is self.keys else 1]]  # read last: see _sinks_last
        rows = store.rows
        if rows and all(buf.start == 0 for buf in rows.values()) and len({b.data.shape[2] for b in rows.values()}) == 1:
            return n_rows, {name: buf.data for name, buf in rows.items()}, fp
        if rows:
            return n_rows, store.row_views(n_rows), fp
        key = (self._shape, self._dtype, self._device, id(store))
        if key not in self._empty_rows:  # a handful of entries: (batch size, side) pairs seen
            batch, heads, dim = self._shape
            spec = store.format.spec(batch, heads, dim, self.fp_dtype, 0)
            self._empty_rows[key] = {name: torch.empty(shape, dtype=dtype, device=self._device)
                                     for name, (shape, dtype) in spec.items()}  # fmt: skip
        return 0, self._empty_rows[key], fp

    def _decode_args(self, query: torch.Tensor, mask: torch.Tensor | None, scale: float) -> tuple:
        """The arguments of :attr:`decode_op` for this step (methods with a fused decode kernel)."""
        raise NotImplementedError

    def _decode(self, query: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
        """The packed attention step: ``query`` (B, H_kv, M, D) float32 grouped rows, ``mask`` None or additive
        (B, H_kv, M, T) -> (B, H_kv, M, D) float32.

        Methods with a fused decode kernel set :attr:`decode_op` and :meth:`_decode_args`: one call. Otherwise
        this composes the formats' ``scores`` and ``weighted_sum``.
        """
        if self.decode_op is not None:
            return self.decode_op(*self._decode_args(query, mask, scale))
        n_keys, key_rows, key_fp = self._rows(self.keys)
        n_values, value_rows, value_fp = self._rows(self.values)
        key_format, value_format = self.keys.format, self.values.format
        key_rows = {name: x[:, :, :n_keys] for name, x in key_rows.items()}
        value_rows = {name: x[:, :, :n_values] for name, x in value_rows.items()}
        scores = (lambda q: key_format.scores(q, key_rows)) if n_keys else None
        return decode.reference(query, scores, key_fp, lambda w: value_format.weighted_sum(w, value_rows),
                                n_values * value_format.unit, value_fp, mask, scale)  # fmt: skip

    def _attend_materialized(self, query: torch.Tensor, scale: float, attention_mask: torch.Tensor | None):
        """:meth:`attend` for many query rows: SDPA (float32) over :meth:`materialize`'s K/V, same masks."""
        self._check_query(query)
        if attention_mask is None:
            attention_mask = self._window_mask(query.shape[2], query.device)
        keys, values = (x.float() for x in self.materialize())
        t_q, total = query.shape[2], keys.shape[2]
        mask = _mask(attention_mask, t_q, total, query.device, whole_causal=True)
        causal = isinstance(mask, str)  # "causal"
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(),
            keys,
            values,
            attn_mask=None if causal else mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        if attention_mask is not None:
            out = out.nan_to_num(0.0)  # rows with nothing to attend to are zero, as on the packed path
        return out.to(query.dtype)

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes held: codes, scales, zeros, fp residual and window, metadata.

        ``allocated=True`` counts the buffers' capacity instead (growth slack included). The fp view of the
        tokens flushed by the latest append is not counted: it shares storage with the counted buffers'
        capacity, and the next append releases it.
        """
        sinks = 0 if self._sinks is None else sum(x.numel() * x.element_size() for x in self._sinks)
        return self.keys.nbytes(allocated) + self.values.nbytes(allocated) + sinks

    # --- saving and loading ---------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The stored state: ``(tensors, metadata)``; :meth:`load_state_dict` on a fresh layer inverts it.

        The fp view of the tokens flushed by the latest append is not saved: after loading, attention reads
        those tokens from their codes, exactly as the next step would have.
        """
        self._require_tokens()
        tensors = {}
        for prefix, store in (("keys", self.keys), ("values", self.values)):
            for name, buf in store.named_buffers().items():
                if buf.data is not None:
                    tensors[f"{prefix}.{name}"] = buf.view().contiguous()
        metadata = {
            "config": self.config.to_dict(),
            "layer_idx": self.layer_idx,
            "shape": list(self._shape),
            "dtype": str(self._dtype).removeprefix("torch."),
            "key_groups": self.keys.num_rows,
            "value_quantized": self.values.num_rows,
        }
        if self.sliding_window is not None:  # (absent otherwise, as the sinks' fields)
            metadata.update(sliding_window=self.sliding_window, drop_unit=self.drop_unit, dropped=self._dropped)
        if (
            self._rotation is not None
        ):  # the codes are of rotated tokens: a config without ``rotate`` must not read them
            metadata["rotated"] = True
        if getattr(self.config, "key_centering", "off") != "off":  # (absent otherwise, as below)
            metadata["key_offset"] = self._key_offset is not None
            if self._key_offset is not None:
                tensors["offset.keys"] = self._key_offset.contiguous()
        if getattr(self.config, "sink_tokens", 0):  # (absent otherwise: files of configs without sinks unchanged)
            metadata["sinks"] = self.num_sinks
            if self._sinks is not None:
                tensors["sinks.keys"], tensors["sinks.values"] = (x.contiguous() for x in self._sinks)
        return tensors, metadata

    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], metadata: dict, *, max_head_dim: int | None = None
    ) -> None:
        """Restore a state saved by :meth:`state_dict` into this (empty) layer, after validating all of it.

        Every field of ``metadata`` and every tensor is checked before anything is built or stored: the
        config equals this layer's; shape, dtype and counts are well typed and consistent (keys and values
        hold the same number of tokens, the residual < R tokens, the window <= R); each tensor has exactly
        the name, shape and dtype the method stores for those counts, no NaN/Inf and no value the store
        never writes (negative scales, out-of-range or unsorted outlier channels). A state that passes is
        one this layer could have produced, so the fused kernels can read it safely.

        Args:
            max_head_dim: refuse a larger saved head_dim before building per-head_dim state (rotations and
                sketches cost O(head_dim^3) to build). None: no bound beyond the config's own rules.

        Raises:
            ValueError: the layer already holds tokens.
            CacheFileError: the state is malformed or was saved with another config (the message says what).
        """
        if self._shape is not None:
            raise ValueError("load_state_dict needs an empty layer; this one holds tokens")
        shape, dtype, counts = self._check_metadata(metadata, max_head_dim)
        batch, heads, dim = shape
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise CacheFileError("the saved state's tensors must be a dict of name -> torch.Tensor")
        devices = {t.device for t in tensors.values()}
        if len(devices) > 1:
            raise CacheFileError(f"the saved state's tensors are on several devices: {sorted(map(str, devices))}")
        self._build(dim)
        tensors = dict(tensors)
        fp_dtype = self.config.fp_dtype(dtype)  # what the fp parts (and the quantizers' inputs) were held in
        sinks = self._check_sinks(metadata, tensors, shape, fp_dtype)  # and takes the sink tensors out
        key_offset = self._check_key_offset(metadata, tensors, shape)  # and takes the offset out
        fp_lengths, restored = [], []
        for prefix, store, count in (("keys", self.keys, counts[0]), ("values", self.values, counts[1])):
            quant_prefix, fp_name = store.names[0] + ".", store.names[1]
            own = {name[len(prefix) + 1 :]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
            spec = store.format.spec(batch, heads, dim, fp_dtype, count)
            spec = {quant_prefix + name: value for name, value in spec.items()}
            unknown = sorted(set(own) - set(spec) - {fp_name})
            if unknown:
                raise CacheFileError(f"unexpected tensors {[f'{prefix}.{n}' for n in unknown]} in the saved state")
            present = [name for name in spec if name in own]
            if (count or present) and len(present) < len(spec):
                missing = [f"{prefix}.{n}" for n in spec if n not in own]
                raise CacheFileError(f"the saved state lacks {missing} ({count} quantized)")
            fp_tensor = own.get(fp_name)
            fp_len = 0 if fp_tensor is None else (fp_tensor.shape[2] if fp_tensor.dim() == 4 else -1)
            spec[fp_name] = ((batch, heads, fp_len, dim), fp_dtype)
            for name, tensor in own.items():
                want_shape, want_dtype = spec[name]
                if tuple(tensor.shape) != want_shape or tensor.dtype != want_dtype:
                    raise CacheFileError(
                        f"{prefix}.{name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                        f"{want_dtype} {want_shape} for shape {tuple(shape)} and {count} quantized"
                    )
                if tensor.layout != torch.strided:
                    raise CacheFileError(f"{prefix}.{name} is a {tensor.layout} tensor, expected a dense one")
            quantized = {name.removeprefix(quant_prefix): own[name] for name in present}
            reason = store.format.check(quantized, dim) or _check_values(
                {fp_name: fp_tensor} if fp_tensor is not None else {}, ()
            )
            if reason:
                raise CacheFileError(f"{prefix}: {reason}")
            fp_lengths.append(fp_len)
            restored.append((store, own, count))
        key_groups, value_quantized = counts
        residual, window = fp_lengths
        residual_length = self.config.residual_length
        key_tokens = key_groups * self.keys.unit + residual
        value_tokens = value_quantized * self.values.unit + window
        if residual >= residual_length or window > residual_length:
            raise CacheFileError(
                f"the key residual holds {residual} tokens and the value window {window}; a store keeps < R = "
                f"{residual_length} and <= R"
            )
        if key_tokens != value_tokens:
            raise CacheFileError(f"the keys hold {key_tokens} tokens but the values {value_tokens}")
        dropped = self._check_dropped(metadata, key_tokens)
        sink_tokens = getattr(self.config, "sink_tokens", 0)
        if key_tokens and (sinks[0].shape[2] if sinks else 0) != sink_tokens:
            raise CacheFileError(f"the state holds tokens past the sinks but not all {sink_tokens} sink tokens")
        for store, own, count in restored:
            store.restore(own, count)
        self._sinks = sinks
        self._key_offset = key_offset
        self._dropped = dropped
        self._shape, self._dtype = shape, dtype
        self._device = next(iter(devices)) if devices else torch.device("cpu")

    def _check_key_offset(self, metadata: dict, tensors: dict, shape) -> torch.Tensor | None:
        """The saved key offset (validated, removed from ``tensors``), or None."""
        offset = tensors.pop("offset.keys", None)
        saved = metadata.get("key_offset", False)
        if type(saved) is not bool:
            raise CacheFileError(f"key_offset must be true or false, got {saved!r}")
        if not saved:
            if offset is not None:
                raise CacheFileError("the saved state holds a key offset but says it has none")
            return None
        want = (1, shape[1], 1, shape[2])
        if (
            offset is None
            or tuple(offset.shape) != want
            or offset.dtype != torch.float32
            or offset.layout != torch.strided
        ):
            got = None if offset is None else f"{offset.dtype} {tuple(offset.shape)}"
            raise CacheFileError(f"offset.keys is {got}, expected torch.float32 {want}")
        if not bool(torch.isfinite(offset).all()):
            raise CacheFileError("offset.keys holds NaN/Inf values")
        return offset

    def _check_dropped(self, metadata: dict, held: int) -> int:
        """A sliding-window layer's saved ``dropped`` count (validated), else 0."""
        if self.sliding_window is None:
            return 0
        window, dropped = metadata["sliding_window"], metadata["dropped"]
        for name, mine in (("sliding_window", self.sliding_window), ("drop_unit", self.drop_unit)):
            if metadata[name] != mine or type(metadata[name]) is not int:
                raise CacheFileError(f"state was saved with {name} {metadata[name]!r}, this layer has {mine}")
        if not _is_count(dropped) or dropped % self.drop_unit:
            raise CacheFileError(f"dropped must be a non-negative multiple of {self.drop_unit}, got {dropped!r}")
        if dropped and held < window - 1:
            raise CacheFileError(
                f"the state dropped {dropped} tokens but holds {held}, fewer than the {window - 1} the next query reads"
            )
        return dropped

    def _check_sinks(self, metadata: dict, tensors: dict, shape, dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The saved sinks (validated, removed from ``tensors``), or None."""
        sink_keys, sink_values = tensors.pop("sinks.keys", None), tensors.pop("sinks.values", None)
        n = metadata.get("sinks", 0)
        if not _is_count(n) or n > getattr(self.config, "sink_tokens", 0):
            raise CacheFileError(f"sinks must be an integer in [0, sink_tokens], got {n!r}")
        if n == 0:
            if sink_keys is not None or sink_values is not None:
                raise CacheFileError("the saved state holds sink tensors but no sinks")
            return None
        want = (*shape[:2], n, shape[2])
        for name, x in (("sinks.keys", sink_keys), ("sinks.values", sink_values)):
            if x is None or tuple(x.shape) != want or x.dtype != dtype or x.layout != torch.strided:
                got = None if x is None else f"{x.dtype} {tuple(x.shape)}"
                raise CacheFileError(f"{name} is {got}, expected {dtype} {want}")
            if not bool(torch.isfinite(x).all()):
                raise CacheFileError(f"{name} holds NaN/Inf values")
        return sink_keys, sink_values

    def _check_metadata(self, metadata, max_head_dim: int | None):
        """Validate :meth:`state_dict`'s metadata; returns ((B, H, D), dtype, (key_groups, value_quantized))."""
        if not isinstance(metadata, dict):
            raise CacheFileError(f"the saved state's metadata must be a dict, got {type(metadata).__name__}")
        fields = {"config", "layer_idx", "shape", "dtype", "key_groups", "value_quantized"}
        if getattr(self.config, "sink_tokens", 0):
            fields.add("sinks")
        if self.sliding_window is not None:
            fields |= {"sliding_window", "drop_unit", "dropped"}
        if getattr(self.config, "key_centering", "off") != "off":
            fields.add("key_offset")
        if getattr(self.config, "rotate", False):
            fields.add("rotated")
        if set(metadata) != fields:
            raise CacheFileError(f"the saved state's metadata has fields {sorted(metadata)}, expected {sorted(fields)}")
        if "rotated" in fields and metadata["rotated"] is not True:
            raise CacheFileError(f"rotated must be true for a config with rotate, got {metadata['rotated']!r}")
        if not _same_config(metadata["config"], self.config):
            raise CacheFileError(
                f"state was saved with config {metadata['config']}, this layer has {self.config.to_dict()}"
            )
        if metadata["layer_idx"] != self.layer_idx or not _is_count(metadata["layer_idx"]):
            raise CacheFileError(f"state was saved for layer {metadata['layer_idx']!r}, this is layer {self.layer_idx}")
        shape = metadata["shape"]
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(_is_count(x) and x > 0 for x in shape)):
            raise CacheFileError(f"shape must be [batch, kv_heads, head_dim] of positive integers, got {shape!r}")
        dim = shape[2]
        if max_head_dim is not None and dim > max_head_dim:
            raise CacheFileError(f"head_dim {dim} is larger than the {max_head_dim} allowed here")
        try:
            self.config.check_head_dim(dim)
        except ValueError as err:
            raise CacheFileError(f"shape {shape}: {err}") from None
        dtype = SCALE_DTYPES.get(metadata["dtype"]) if isinstance(metadata["dtype"], str) else None
        if dtype is None:
            raise CacheFileError(f"dtype must be one of {tuple(SCALE_DTYPES)}, got {metadata['dtype']!r}")
        counts = metadata["key_groups"], metadata["value_quantized"]
        if not all(_is_count(x) for x in counts):
            raise CacheFileError(f"key_groups and value_quantized must be non-negative integers, got {counts!r}")
        return tuple(shape), dtype, counts

    # --- cache housekeeping (beam search, assisted decoding) ------------------------------------------
    def crop(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (negative: drop that many from the end)."""
        if self._shape is None:
            return  # nothing stored
        if num_tokens < 0:
            num_tokens = max(self.num_tokens + num_tokens, 0)
        if self._dropped and num_tokens < self.sliding_window - 1:
            raise ValueError(
                f"a sliding-window layer that dropped its oldest tokens keeps at least sliding_window - 1 = "
                f"{self.sliding_window - 1} (the next query reads them), got a crop to {num_tokens}"
            )
        sinks = self.num_sinks
        if num_tokens < sinks:
            self._sinks = tuple(x[:, :, :num_tokens].clone() for x in self._sinks) if num_tokens else None
        self.keys.crop(max(num_tokens - sinks, 0), self.fp_dtype)
        self.values.crop(max(num_tokens - sinks, 0), self.fp_dtype)

    def _apply_batch(self, fn) -> None:
        if self._shape is None:
            return
        self.keys.pending = self.values.pending = None
        self.keys._undo = self.values._undo = None
        for buf in self.keys.buffers() + self.values.buffers():
            buf.apply(fn)
        if self._sinks is not None:
            self._sinks = (fn(self._sinks[0]), fn(self._sinks[1]))
        probe = fn(torch.empty(self._shape[0], 1))
        self._shape = (probe.shape[0],) + self._shape[1:]

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep / reorder batch rows (beam search)."""
        self._apply_batch(lambda x: x.index_select(0, indices.to(x.device)))

    def repeat_batch(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times (``repeat_interleave``)."""
        self._apply_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def _require_tokens(self) -> None:
        if self._shape is None:
            raise ValueError("the layer holds no tokens yet; append keys and values first")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer_idx={self.layer_idx}, tokens={self.num_tokens}, config={self.config})"
