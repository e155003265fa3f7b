"""The per-layer state machine shared by every method.

A layer is a key store plus a value store. Both follow KIVI's residual rules (arXiv 2402.02750, Alg. 1):

* keys collect in a full-precision residual; whenever it holds ``>= R`` tokens, its oldest
  ``floor(n / R) * R`` tokens are quantized as whole blocks (groups of ``G`` tokens) and leave it;
* values keep exactly the last ``R`` tokens in full precision; older ones are quantized per token.

Quantized history never changes again. The tokens flushed by the latest ``append`` stay visible in full
precision to the attention of that same step (the reference code attends before it flushes, and prefill
attention is exact); ``dequantize()`` shows the stored state after the flush. That copy is a view of
buffers the layer already holds and is released by the next ``append``.

Every per-token or per-group tensor lives in a :class:`GrowBuffer` along axis 2, laid out for the fused
decode kernels in :mod:`kvpack.kernels`.
"""

from __future__ import annotations

import abc
import math

import torch

from ..config import MethodConfig
from ..errors import CacheFileError

__all__ = ["GrowBuffer", "BlockKeyStore", "TokenValueStore", "QuantizedValueStore", "CompressedLayer"]

_GROWTH = 1.5
#: ``attend`` with at least this many query rows (prefill, chunked prefill) dequantizes the store once and
#: runs torch's fused SDPA: the dequantization is O(T) against the O(T_q * T) attention, and SDPA never
#: builds the (T_q, T) score matrix. Decode (1 row) and short speculative drafts read the packed codes.
SDPA_MIN_QUERIES = 16


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
        n = x.shape[2]
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
        self.data[:, :, end : end + n] = x
        self.length += n

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


def _buffers_nbytes(buffers, allocated: bool) -> int:
    return sum(b.nbytes(allocated) for b in buffers)


def _check_values(tensors: dict[str, torch.Tensor], nonnegative: tuple[str, ...]) -> str | None:
    """Why ``tensors`` hold values a store never writes (NaN/Inf, a negative scale), or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return f"{name} holds NaN/Inf values"
        if name in nonnegative and tensor.numel() and bool((tensor < 0).any()):
            return f"{name} holds negative values (the store writes only scales/norms >= 0)"
    return None


class BlockKeyStore(abc.ABC):
    """Keys: an fp residual flushed to quantized groups in blocks of ``R`` tokens.

    Subclasses define the quantized format through :meth:`quantize_groups` (fp keys -> per-group tensors,
    each ``(B, H, n_groups, ...)``), :meth:`group_scores` and :meth:`dequantize_groups`.
    """

    def __init__(self, group_size: int, residual_length: int) -> None:
        self.group_size = group_size
        self.residual_length = residual_length
        self.groups: dict[str, GrowBuffer] = {}
        self.residual = GrowBuffer()
        self.pending: torch.Tensor | None = None  # fp copy of the groups flushed by the last append
        self.num_groups = 0
        self._undo: tuple | None = None  # (residual length before, tokens flushed, replaced storage) of the last append

    # --- format, defined by each method -------------------------------------------------------------
    @abc.abstractmethod
    def quantize_groups(self, keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """``keys`` (B, H, n * G, D) -> named tensors, each (B, H, n, ...)."""

    @abc.abstractmethod
    def group_scores(self, query: torch.Tensor, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        """``query`` (B, H, M, D) float32 -> (B, H, M, n * G) float32 estimates of q.k."""

    @abc.abstractmethod
    def dequantize_groups(self, groups: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named tensors (B, H, n, ...) -> (B, H, n * G, D) float32 reconstruction."""

    @abc.abstractmethod
    def group_spec(self, batch: int, heads: int, dim: int, dtype: torch.dtype, n: int) -> dict[str, tuple]:
        """What :meth:`quantize_groups` stores for ``n`` groups: name -> (shape, dtype), for load validation."""

    def check_groups(self, groups: dict[str, torch.Tensor], dim: int) -> str | None:
        """Why loaded groups (shapes already checked) are not something this store writes, or None.

        The base rule: no NaN/Inf in floating tensors (the store refuses them on append), and the scale-like
        tensors named in ``nonnegative`` are >= 0.
        """
        return _check_values(groups, self.nonnegative)

    #: Group tensors that the store only ever writes >= 0 (scales, norms).
    nonnegative: tuple[str, ...] = ()

    # --- state machine ------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.num_groups * self.group_size + self.residual.length

    def append(self, keys: torch.Tensor) -> None:
        self.pending = None
        before = self.residual.length
        self.residual.append(keys)
        n_flush = (self.residual.length // self.residual_length) * self.residual_length
        if n_flush:
            flushed = self.residual.view()[:, :, :n_flush]
            try:
                quantized = self.quantize_groups(flushed)
            except Exception:
                self.residual.truncate(before)  # a failed flush (e.g. scale overflow) stores nothing
                raise
            for name, tensor in quantized.items():
                self.groups.setdefault(name, GrowBuffer()).append(tensor)
            self.num_groups += n_flush // self.group_size
            # A prompt leaves < R keys in a prompt-sized buffer: shrink it (room for in-place compaction).
            replaced = self.residual.drop_front(n_flush, keep_capacity=2 * self.residual_length + 16)
            self.pending = flushed  # a live view: neither compaction nor shrinking touches it before the next append
        else:
            replaced = None
        self._undo = (before, n_flush, replaced)

    def undo_append(self) -> None:
        """Exactly undo the last :meth:`append` (the layer calls this when the value side then fails).

        Appending only writes past the live residual and past the live groups, and a flush only moves the
        residual's start, so truncating the groups and moving the start back restores every byte.
        """
        if self._undo is None:
            raise RuntimeError("undo_append: no append to undo")
        before, n_flush, replaced = self._undo
        self._undo = self.pending = None
        if n_flush:
            self.num_groups -= n_flush // self.group_size
            for buf in self.groups.values():
                buf.truncate(self.num_groups)
            self.groups = {name: buf for name, buf in self.groups.items() if buf.length}  # as before a first flush
            self.residual.undrop_front(n_flush, replaced)
        self.residual.truncate(before)

    def group_views(self, n_groups: int | None = None) -> dict[str, torch.Tensor]:
        n = self.num_groups if n_groups is None else n_groups
        return {name: buf.view()[:, :, :n] for name, buf in self.groups.items()}

    def _split(self) -> tuple[int, list[torch.Tensor]]:
        """Quantized groups attention reads, and the fp tensors that follow them (pending, residual)."""
        fp = [] if self.residual.length == 0 else [self.residual.view()]
        if self.pending is None:
            return self.num_groups, fp
        return self.num_groups - self.pending.shape[2] // self.group_size, [self.pending, *fp]

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """q.k for every attended key: ``query`` (B, H, M, D) float32 -> (B, H, M, T) float32."""
        n_quant, fp = self._split()
        parts = []
        if n_quant:
            parts.append(self.group_scores(query, self.group_views(n_quant)))
        parts += [query @ k.float().transpose(-1, -2) for k in fp]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def materialize(self) -> torch.Tensor:
        """The keys attention uses this step (pending groups in fp), (B, H, T, D) float32."""
        n_quant, fp = self._split()
        parts = [self.dequantize_groups(self.group_views(n_quant))] if n_quant else []
        parts += [k.float() for k in fp]
        return torch.cat(parts, dim=2)

    def dequantize(self) -> torch.Tensor:
        """The stored state, (B, H, T, D) float32."""
        parts = [self.dequantize_groups(self.group_views())] if self.num_groups else []
        if self.residual.length:
            parts.append(self.residual.view().float())
        return torch.cat(parts, dim=2)

    def crop(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens.

        Whole quantized groups past the cut are dropped; the surviving tokens of a group cut in the middle
        return to the fp residual as their reconstruction (they are quantized again when next flushed).
        """
        self.pending = self._undo = None
        n_quant_tokens = self.num_groups * self.group_size
        if num_tokens >= n_quant_tokens:
            self.residual.truncate(num_tokens - n_quant_tokens)
            return
        keep_groups = num_tokens // self.group_size
        tail = num_tokens - keep_groups * self.group_size
        tail_keys = None
        if tail:
            views = {name: v[:, :, keep_groups : keep_groups + 1] for name, v in self.group_views().items()}
            tail_keys = self.dequantize_groups(views)[:, :, :tail]
        dtype = self.residual.data.dtype
        for buf in self.groups.values():
            buf.truncate(keep_groups)
        self.num_groups = keep_groups
        self.residual = GrowBuffer()
        if tail_keys is not None:
            self.residual.append(tail_keys.to(dtype))

    def named_buffers(self) -> dict[str, GrowBuffer]:
        return {**{f"groups.{name}": buf for name, buf in self.groups.items()}, "residual": self.residual}

    def buffers(self) -> list[GrowBuffer]:
        return list(self.named_buffers().values())

    def nbytes(self, allocated: bool = False) -> int:
        return _buffers_nbytes(self.buffers(), allocated)

    def restore(self, tensors: dict[str, torch.Tensor], num_groups: int) -> None:
        """Load :meth:`named_buffers` contents saved by :meth:`CompressedLayer.state_dict`."""
        self.pending = self._undo = None
        for name, tensor in tensors.items():
            buf = GrowBuffer()
            buf.append(tensor)
            if name == "residual":
                self.residual = buf
            else:
                self.groups[name.removeprefix("groups.")] = buf
        self.num_groups = num_groups


class TokenValueStore(abc.ABC):
    """Values: the last ``R`` tokens in fp, older ones quantized token by token as they leave the window.

    Subclasses define the per-token format through :meth:`quantize_tokens` (fp values -> named tensors,
    each ``(B, H, n, ...)``), :meth:`token_weighted_sum` and :meth:`dequantize_tokens`.
    """

    def __init__(self, residual_length: int) -> None:
        self.residual_length = residual_length
        self.tokens: dict[str, GrowBuffer] = {}
        self.window = GrowBuffer()
        self.pending: torch.Tensor | None = None  # fp copy of the tokens flushed by the last append
        self.num_quantized = 0
        self._undo: tuple | None = None  # (window length before, tokens flushed, replaced storage) of the last append

    @abc.abstractmethod
    def quantize_tokens(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``values`` (B, H, n, D) -> named tensors, each (B, H, n, ...)."""

    @abc.abstractmethod
    def token_weighted_sum(self, weights: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """``weights`` (B, H, M, n) float32 -> (B, H, M, D) float32 over the quantized tokens."""

    @abc.abstractmethod
    def dequantize_tokens(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Named tensors (B, H, n, ...) -> (B, H, n, D) float32."""

    @abc.abstractmethod
    def token_spec(self, batch: int, heads: int, dim: int, dtype: torch.dtype, n: int) -> dict[str, tuple]:
        """What :meth:`quantize_tokens` stores for ``n`` tokens: name -> (shape, dtype), for load validation."""

    def check_tokens(self, tokens: dict[str, torch.Tensor], dim: int) -> str | None:
        """Why loaded tokens (shapes already checked) are not something this store writes, or None."""
        return _check_values(tokens, self.nonnegative)

    #: Token tensors that the store only ever writes >= 0 (scales).
    nonnegative: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return self.num_quantized + self.window.length

    def append(self, values: torch.Tensor) -> None:
        self.pending = None
        before = self.window.length
        self.window.append(values)
        n_flush = self.window.length - self.residual_length
        if n_flush > 0:
            flushed = self.window.view()[:, :, :n_flush]
            try:
                quantized = self.quantize_tokens(flushed)
            except Exception:
                self.window.truncate(before)  # a failed flush stores nothing
                raise
            for name, tensor in quantized.items():
                self.tokens.setdefault(name, GrowBuffer()).append(tensor)
            self.num_quantized += n_flush
            # room for R + one step; a prompt-sized buffer is replaced (see BlockKeyStore.append)
            replaced = self.window.drop_front(n_flush, keep_capacity=2 * self.residual_length + 16)
            self.pending = flushed
        else:
            replaced = None
        self._undo = (before, max(n_flush, 0), replaced)

    def undo_append(self) -> None:
        """Exactly undo the last :meth:`append` (see :meth:`BlockKeyStore.undo_append`)."""
        if self._undo is None:
            raise RuntimeError("undo_append: no append to undo")
        before, n_flush, replaced = self._undo
        self._undo = self.pending = None
        if n_flush:
            self.num_quantized -= n_flush
            for buf in self.tokens.values():
                buf.truncate(self.num_quantized)
            self.tokens = {name: buf for name, buf in self.tokens.items() if buf.length}
            self.window.undrop_front(n_flush, replaced)
        self.window.truncate(before)

    def token_views(self, n: int | None = None) -> dict[str, torch.Tensor]:
        n = self.num_quantized if n is None else n
        return {name: buf.view()[:, :, :n] for name, buf in self.tokens.items()}

    def _split(self) -> tuple[int, list[torch.Tensor]]:
        fp = [] if self.window.length == 0 else [self.window.view()]
        if self.pending is None:
            return self.num_quantized, fp
        return self.num_quantized - self.pending.shape[2], [self.pending, *fp]

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` (B, H, M, T) float32 -> sum_t weights[..., t] * v_t, (B, H, M, D) float32."""
        n_quant, fp = self._split()
        out = self.token_weighted_sum(weights[..., :n_quant], self.token_views(n_quant)) if n_quant else None
        start = n_quant
        for v in fp:
            part = weights[..., start : start + v.shape[2]] @ v.float()
            out = part if out is None else out + part
            start += v.shape[2]
        return out

    def materialize(self) -> torch.Tensor:
        n_quant, fp = self._split()
        parts = [self.dequantize_tokens(self.token_views(n_quant))] if n_quant else []
        return torch.cat(parts + [v.float() for v in fp], dim=2)

    def dequantize(self) -> torch.Tensor:
        parts = [self.dequantize_tokens(self.token_views())] if self.num_quantized else []
        if self.window.length:
            parts.append(self.window.view().float())
        return torch.cat(parts, dim=2)

    def crop(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (per-token codes need no re-quantization)."""
        self.pending = self._undo = None
        if num_tokens >= self.num_quantized:
            self.window.truncate(num_tokens - self.num_quantized)
        else:
            for buf in self.tokens.values():
                buf.truncate(num_tokens)
            self.num_quantized = num_tokens
            self.window.truncate(0)

    def named_buffers(self) -> dict[str, GrowBuffer]:
        return {**{f"tokens.{name}": buf for name, buf in self.tokens.items()}, "window": self.window}

    def buffers(self) -> list[GrowBuffer]:
        return list(self.named_buffers().values())

    def nbytes(self, allocated: bool = False) -> int:
        return _buffers_nbytes(self.buffers(), allocated)

    def restore(self, tensors: dict[str, torch.Tensor], num_quantized: int) -> None:
        """Load :meth:`named_buffers` contents saved by :meth:`CompressedLayer.state_dict`."""
        self.pending = self._undo = None
        for name, tensor in tensors.items():
            buf = GrowBuffer()
            buf.append(tensor)
            if name == "window":
                self.window = buf
            else:
                self.tokens[name.removeprefix("tokens.")] = buf
        self.num_quantized = num_quantized


class QuantizedValueStore(TokenValueStore):
    """KIVI values: per token, asymmetric min-max in groups of ``G`` channels.

    Storage (kernel layout): ``codes`` (B, H, T_q, D * bits / 8) uint8 packed LSB-first along channels,
    ``scale`` / ``zero`` (B, H, T_q, D / G) in ``scale_dtype``; ``window`` (B, H, <= R, D) input dtype.
    """

    def __init__(self, bits: int, group_size: int, residual_length: int, scale_dtype: torch.dtype | None):
        super().__init__(residual_length)
        self.bits = bits
        self.group_size = group_size
        self.scale_dtype = scale_dtype

    @property
    def codes(self) -> GrowBuffer:
        return self.tokens["codes"]

    def quantize_tokens(self, values):
        from .. import kernels

        codes, scale, zero = kernels.quantize_pack_tokens(values, self.bits, self.group_size, self.scale_dtype)
        return {"codes": codes, "scale": scale, "zero": zero}  # (B, H, n, D * bits / 8), (B, H, n, D / G) x2

    def token_weighted_sum(self, weights, tokens):
        from .. import kernels

        return kernels.value_weighted_sum(
            weights, tokens["codes"], tokens["scale"], tokens["zero"], self.bits, self.group_size
        )

    nonnegative = ("scale",)

    def token_spec(self, batch, heads, dim, dtype, n):
        scale = ((batch, heads, n, dim // self.group_size), self.scale_dtype or dtype)
        return {"codes": ((batch, heads, n, dim * self.bits // 8), torch.uint8), "scale": scale, "zero": scale}

    def dequantize_tokens(self, tokens):
        from ..primitives import dequantize_affine, unpack_bits

        dim = tokens["scale"].shape[-1] * self.group_size
        codes = unpack_bits(tokens["codes"], self.bits, dim)
        return dequantize_affine(codes, tokens["scale"], tokens["zero"], self.group_size, -1)


_STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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


class CompressedLayer:
    """One attention layer's compressed KV store: the public per-layer API of every method.

    Subclasses build ``self.keys`` (a :class:`BlockKeyStore`) and ``self.values``.
    """

    config: MethodConfig
    keys: BlockKeyStore
    values: TokenValueStore

    def __init__(self, config: MethodConfig, layer_idx: int = 0) -> None:
        self.config = config
        self.layer_idx = layer_idx
        self._shape: tuple[int, int, int] | None = None  # (B, H_kv, D)
        self._dtype: torch.dtype | None = None
        self._device: torch.device | None = None

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
            raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}")
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
        if getattr(self.config, "check_finite", True):
            for name, x in (("keys", keys), ("values", values)):
                bad = int((~torch.isfinite(x)).sum())
                if bad:
                    raise ValueError(f"{name} contain {bad} NaN/Inf values; nothing was stored")

    def _build(self, head_dim: int) -> None:
        """Hook for methods whose stores depend on head_dim: called once, before the first tokens."""

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
        try:
            self.keys.append(keys)  # a failing store leaves itself unchanged
            try:
                self.values.append(values)
            except Exception:
                self.keys.undo_append()  # keys and values stay in step: nothing of this call is stored
                raise
        except Exception:
            if first:
                self._shape = self._dtype = self._device = None
            raise

    @property
    def num_tokens(self) -> int:
        """Tokens held."""
        return self.keys.num_tokens

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the appended keys/values (None before the first append)."""
        return self._dtype

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """``(batch, kv_heads, head_dim)`` of the stored tokens (None before the first append)."""
        return self._shape

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored state: (k_hat, v_hat), each (B, H_kv, T_total, D) in the input dtype."""
        self._require_tokens()
        return self.keys.dequantize().to(self._dtype), self.values.dequantize().to(self._dtype)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What ``attend`` reads this step, dequantized: like :meth:`dequantize`, but the tokens flushed
        by the latest ``append`` appear in full precision (the compat attention path uses this)."""
        self._require_tokens()
        return self.keys.materialize().to(self._dtype), self.values.materialize().to(self._dtype)

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
        """(B, H_q, T_q, D) -> (B, H_kv, rep * T_q, D) float32; query head h reads kv head h // rep."""
        self._check_query(query)
        batch, heads_q, t_q, dim = query.shape
        heads_kv = self._shape[1]
        return query.float().reshape(batch, heads_kv, (heads_q // heads_kv) * t_q, dim)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Unscaled q.k over the attended keys: (B, H_q, T_q, D) -> (B, H_q, T_q, T_total) float32."""
        grouped = self._group_query(query)
        batch, heads_q, t_q, _ = query.shape
        return self.keys.scores(grouped).reshape(batch, heads_q, t_q, -1)

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
        batch, heads_q, t_q, dim = query.shape
        scale = dim**-0.5 if scale is None else scale
        if t_q >= SDPA_MIN_QUERIES:
            return self._attend_materialized(query, scale, attention_mask)
        scores = self.scores(query) * scale  # (B, H_q, T_q, T)
        total = scores.shape[-1]
        if attention_mask is not None:
            mask = _last_columns(attention_mask, total)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        elif t_q > 1:
            if t_q > total:
                raise ValueError(f"{t_q} queries but only {total} tokens stored")
            causal = torch.ones(t_q, total, dtype=torch.bool, device=scores.device).tril(total - t_q)
            scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if attention_mask is not None:
            probs = probs.nan_to_num(0.0)
        heads_kv = self._shape[1]
        out = self.values.weighted_sum(probs.reshape(batch, heads_kv, -1, total))  # (B, H_kv, rep*T_q, D)
        return out.reshape(batch, heads_q, t_q, dim).to(query.dtype)

    def _attend_materialized(self, query: torch.Tensor, scale: float, attention_mask: torch.Tensor | None):
        """:meth:`attend` for many query rows: SDPA (float32) over :meth:`materialize`'s K/V, same masks."""
        self._check_query(query)
        keys, values = (x.float() for x in self.materialize())
        t_q, total = query.shape[2], keys.shape[2]
        mask, causal = None, False
        if attention_mask is not None:
            mask = _last_columns(attention_mask, total)
        elif t_q > total:
            raise ValueError(f"{t_q} queries but only {total} tokens stored")
        elif t_q == total:
            causal = True
        else:  # the queries are the last t_q positions
            mask = torch.ones(t_q, total, dtype=torch.bool, device=query.device).tril(total - t_q)
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
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
        return self.keys.nbytes(allocated) + self.values.nbytes(allocated)

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
            "key_groups": self.keys.num_groups,
            "value_quantized": self.values.num_quantized,
        }
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
        stores = (("keys", self.keys, "residual", "groups."), ("values", self.values, "window", "tokens."))
        fp_lengths, restored = [], []
        for (prefix, store, fp_name, quant_prefix), count in zip(stores, counts):
            own = {name[len(prefix) + 1 :]: t for name, t in tensors.items() if name.startswith(prefix + ".")}
            if prefix == "keys":
                spec = store.group_spec(batch, heads, dim, dtype, count)
            else:
                spec = store.token_spec(batch, heads, dim, dtype, count)
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
            spec[fp_name] = ((batch, heads, fp_len, dim), dtype)
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
            check = store.check_groups if prefix == "keys" else store.check_tokens
            reason = check(quantized, dim) or _check_values({fp_name: fp_tensor} if fp_tensor is not None else {}, ())
            if reason:
                raise CacheFileError(f"{prefix}: {reason}")
            fp_lengths.append(fp_len)
            restored.append((store, own, count))
        key_groups, value_quantized = counts
        residual, window = fp_lengths
        residual_length = self.config.residual_length
        key_tokens, value_tokens = key_groups * self.config.group_size + residual, value_quantized + window
        if residual >= residual_length or window > residual_length:
            raise CacheFileError(
                f"the key residual holds {residual} tokens and the value window {window}; a store keeps < R = "
                f"{residual_length} and <= R"
            )
        if key_tokens != value_tokens:
            raise CacheFileError(f"the keys hold {key_tokens} tokens but the values {value_tokens}")
        for store, own, count in restored:
            store.restore(own, count)
        self._shape, self._dtype = shape, dtype
        self._device = next(iter(devices)) if devices else torch.device("cpu")

    def _check_metadata(self, metadata, max_head_dim: int | None):
        """Validate :meth:`state_dict`'s metadata; returns ((B, H, D), dtype, (key_groups, value_quantized))."""
        if not isinstance(metadata, dict):
            raise CacheFileError(f"the saved state's metadata must be a dict, got {type(metadata).__name__}")
        fields = {"config", "layer_idx", "shape", "dtype", "key_groups", "value_quantized"}
        if set(metadata) != fields:
            raise CacheFileError(
                f"the saved state's metadata has fields {sorted(metadata)}, expected {sorted(fields)}"
            )
        if metadata["config"] != self.config.to_dict():
            raise CacheFileError(f"state was saved with config {metadata['config']}, this layer has {self.config.to_dict()}")
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
        dtype = _STATE_DTYPES.get(metadata["dtype"]) if isinstance(metadata["dtype"], str) else None
        if dtype is None:
            raise CacheFileError(f"dtype must be one of {tuple(_STATE_DTYPES)}, got {metadata['dtype']!r}")
        counts = metadata["key_groups"], metadata["value_quantized"]
        if not all(_is_count(x) for x in counts):
            raise CacheFileError(f"key_groups and value_quantized must be non-negative integers, got {counts!r}")
        return tuple(shape), dtype, counts

    # --- cache housekeeping (beam search, assisted decoding) ------------------------------------------
    def crop(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (negative: drop that many from the end)."""
        if self._shape is None:
            return  # nothing stored (and a method's stores may not exist before the first append)
        if num_tokens < 0:
            num_tokens = max(self.num_tokens + num_tokens, 0)
        self.keys.crop(num_tokens)
        self.values.crop(num_tokens)

    def _apply_batch(self, fn) -> None:
        if self._shape is None:
            return
        self.keys.pending = self.values.pending = None
        self.keys._undo = self.values._undo = None
        for buf in self.keys.buffers() + self.values.buffers():
            buf.apply(fn)
        if self._shape is not None:
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


def bits_per_element(nbytes: int, batch: int, heads: int, tokens: int, head_dim: int) -> float:
    """Effective bits per stored K or V element: ``8 * nbytes / (2 * B * H * T * D)``."""
    return 8 * nbytes / (2 * batch * heads * tokens * head_dim) if tokens else math.nan
