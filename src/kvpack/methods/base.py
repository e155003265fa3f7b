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

    def dequantize_tokens(self, tokens):
        from ..primitives import dequantize_affine, unpack_bits

        dim = tokens["scale"].shape[-1] * self.group_size
        codes = unpack_bits(tokens["codes"], self.bits, dim)
        return dequantize_affine(codes, tokens["scale"], tokens["zero"], self.group_size, -1)


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

    # --- input checks ---------------------------------------------------------------------------------
    def _check(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for name, x in (("keys", keys), ("values", values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{name} must have shape (batch, kv_heads, tokens, head_dim), got {tuple(x.shape)}")
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
        if keys.shape != values.shape:
            raise ValueError(f"keys and values must have the same shape, got {tuple(keys.shape)} and {tuple(values.shape)}")
        if keys.dtype != values.dtype:
            raise TypeError(f"keys and values must share a dtype, got {keys.dtype} and {values.dtype}")
        batch, heads, _, dim = keys.shape
        if self._shape is not None and (batch, heads, dim) != self._shape:
            raise ValueError(
                f"append expects (batch, kv_heads, head_dim) = {self._shape} as before, got {(batch, heads, dim)}"
            )
        if self._dtype is not None and keys.dtype != self._dtype:
            raise TypeError(f"append expects dtype {self._dtype} as before, got {keys.dtype}")
        if self._shape is None and dim % self.config.group_size:
            raise ValueError(f"group_size {self.config.group_size} must divide head_dim {dim}")
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
            self._dtype = keys.dtype
        try:
            self.keys.append(keys)  # a failing store leaves itself unchanged
            try:
                self.values.append(values)
            except Exception:
                self.keys.undo_append()  # keys and values stay in step: nothing of this call is stored
                raise
        except Exception:
            if first:
                self._shape = self._dtype = None
            raise

    @property
    def num_tokens(self) -> int:
        """Tokens held."""
        return self.keys.num_tokens

    @property
    def dtype(self) -> torch.dtype | None:
        return self._dtype

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
        """
        batch, heads_q, t_q, dim = query.shape
        scale = dim**-0.5 if scale is None else scale
        if t_q >= SDPA_MIN_QUERIES:
            return self._attend_materialized(query, scale, attention_mask)
        scores = self.scores(query) * scale  # (B, H_q, T_q, T)
        total = scores.shape[-1]
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask[..., -total:], float("-inf"))
            else:
                scores = scores + attention_mask[..., -total:].float()
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
            mask = attention_mask[..., -total:]
            mask = mask if mask.dtype == torch.bool else mask.float()
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

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        """Restore a state saved by :meth:`state_dict` into this (empty) layer.

        Raises:
            ValueError: the layer already holds tokens, or the state was saved with another config.
        """
        if self._shape is not None:
            raise ValueError("load_state_dict needs an empty layer; this one holds tokens")
        if metadata["config"] != self.config.to_dict():
            raise ValueError(f"state was saved with config {metadata['config']}, this layer has {self.config.to_dict()}")
        batch, heads, dim = metadata["shape"]
        self._build(dim)
        self._shape = (batch, heads, dim)
        self._dtype = getattr(torch, metadata["dtype"])
        for prefix, store, count in (("keys", self.keys, "key_groups"), ("values", self.values, "value_quantized")):
            own = {name.removeprefix(prefix + "."): t for name, t in tensors.items() if name.startswith(prefix + ".")}
            store.restore(own, metadata[count])

    # --- cache housekeeping (beam search, assisted decoding) ------------------------------------------
    def crop(self, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (negative: drop that many from the end)."""
        if num_tokens < 0:
            num_tokens = max(self.num_tokens + num_tokens, 0)
        self.keys.crop(num_tokens)
        self.values.crop(num_tokens)

    def _apply_batch(self, fn) -> None:
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
