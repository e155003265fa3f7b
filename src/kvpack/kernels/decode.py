"""The fused decode step's shared parts: the argument struct every method's decode entry point starts with
(``DecodeArgs`` in ``kernels/csrc/decode.h``), its check, and the reference composition.

A method's decode op (``kivi_decode``, ``qjl_decode``, ``turbo_decode``) computes, for the M query rows of
each (batch, kv head), ``softmax(scale * q.K^T + mask) V`` over the store's packed rows and the fp tokens
that follow them (``key_fp`` / ``value_fp``: at most three tensors per side, the block flushed by this step's
append, the residual or window, and the attention sinks), in one C++ call. Its reference is :func:`reference`, composed of the
method's own per-kernel ops (so ``kernels.use("reference")`` gives the pure-torch oracle).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from . import native
from .checks import SCALE_TYPES, small

__all__ = ["DecodeArgs", "FpTokens", "check", "fake", "fields", "reference"]

_P, _I = ctypes.c_void_p, ctypes.c_int64
_FP_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NAMES = ("batch", "heads", "rows", "head_dim", "tokens")


class FpChunk(ctypes.Structure):
    _fields_ = [("data", _P), ("strides", _I * 3), ("length", _I)]


#: fp chunks per side the decode kernels read: the block this step flushed, the residual or window, the sinks.
FP_CHUNKS = 3


class FpTokens(ctypes.Structure):
    _fields_ = [("chunk", FpChunk * FP_CHUNKS), ("type", _I)]


class DecodeArgs(ctypes.Structure):
    _fields_ = [("query", _P), ("query_strides", _I * 3), ("mask", _P), ("mask_strides", _I * 3),
                ("keys", FpTokens), ("values", FpTokens), ("batch", _I), ("heads", _I), ("rows", _I),
                ("head_dim", _I), ("key_quantized", _I), ("value_quantized", _I), ("tokens", _I), ("threads", _I),
                ("scale", ctypes.c_double), ("out", _P)]  # fmt: skip


def _fp_side(name: str, parts, batch: int, heads: int, dim: int) -> int:
    """Check one side's fp tensors (a list of <= FP_CHUNKS, each (B, H, L, D), one fp dtype); returns their
    tokens."""
    if not isinstance(parts, (list, tuple)) or len(parts) > FP_CHUNKS:
        raise TypeError(f"{name} must be a list of at most {FP_CHUNKS} tensors")
    total = 0
    for x in parts:
        if not isinstance(x, torch.Tensor) or x.layout is not torch.strided:
            raise TypeError(f"{name} must hold dense tensors, got {type(x).__name__}")
        shape = x.shape
        if len(shape) != 4 or shape[0] != batch or shape[1] != heads or shape[3] != dim:
            raise ValueError(f"{name} tensors must be (batch, heads, tokens, head_dim) = ({batch}, {heads}, *, {dim}), "
                             f"got {tuple(shape)}")  # fmt: skip
        if x.dtype not in _FP_DTYPES or x.dtype != parts[0].dtype:
            raise TypeError(f"{name} tensors must share one dtype of {_FP_DTYPES}, got {[p.dtype for p in parts]}")
        total += shape[2]
    return total


def check(query, key_fp, value_fp, mask, scale, key_quantized: int, value_quantized: int) -> tuple[str | None, int]:
    """The structural check every decode op starts with: raises for malformed input; returns (why only the
    reference can run, or None; the token count T).

    ``query`` (B, H, M, D) float32; ``key_quantized`` / ``value_quantized``: tokens held in the packed rows
    (the caller derives them from shapes it has checked); ``mask`` None or (B, H, M, T) floating, additive.
    """
    if not isinstance(query, torch.Tensor) or query.dim() != 4:
        raise ValueError(f"query must be a (batch, heads, rows, head_dim) tensor, got {getattr(query, 'shape', query)}")
    batch, heads, rows, dim = query.shape
    keys = key_quantized + _fp_side("key_fp", key_fp, batch, heads, dim)
    tokens = value_quantized + _fp_side("value_fp", value_fp, batch, heads, dim)
    if keys != tokens:
        raise ValueError(f"keys hold {keys} tokens but values {tokens}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or not mask.is_floating_point():
            raise TypeError("mask must be None or an additive floating tensor")
        if mask.shape != (batch, heads, rows, tokens):
            raise ValueError(f"mask shape {tuple(mask.shape)} must be (batch, heads, rows, tokens) = "
                             f"{(batch, heads, rows, tokens)}")  # fmt: skip
    small(_NAMES, batch, heads, rows, dim, tokens)
    if query.dtype != torch.float32:
        return f"query dtype {query.dtype} (the fused step takes float32)", tokens
    for x in (query, *key_fp, *value_fp, *(() if mask is None else (mask,))):
        if not x.is_cpu:
            return f"device {x.device.type} (fast kernels run on CPU)", tokens
    if mask is not None and mask.dtype != torch.float32:
        return f"mask dtype {mask.dtype} (the fused step takes float32)", tokens
    if tokens == 0 or batch * heads * rows == 0:
        return "nothing to attend", tokens
    return None, tokens


_NO_CHUNK = (0, 0, 0, 0, 0)


def _side_fields(parts) -> list[int]:
    """An :class:`FpTokens` as flat fields: FP_CHUNKS chunks (data, 3 strides, length), then the dtype code."""
    fields = []
    for x in parts:
        if x.stride(-1) != 1 and x.shape[2] and x.shape[3] > 1:
            raise ValueError("fp tokens must have a contiguous last axis")  # the store's always do
        fields += (x.data_ptr(), *x.stride()[:3], x.shape[2])
    for _ in range(FP_CHUNKS - len(parts)):
        fields += _NO_CHUNK
    fields.append(SCALE_TYPES[parts[0].dtype] if parts else 0)
    return fields


def fields(query, key_fp, value_fp, mask, scale, key_quantized, value_quantized, tokens, out) -> tuple[list, tuple]:
    """The common part of a method's argument struct as flat fields (:func:`kvpack.kernels.native.call_flat`),
    after :func:`check` returned no reason; and the query and mask passed (contiguous copies where their last
    axis was not), which the caller keeps alive until the call returns."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    batch, heads, rows, dim = query.shape
    head = [query.data_ptr(), *query.stride()[:3]]
    head += (0, 0, 0, 0) if mask is None else (mask.data_ptr(), *mask.stride()[:3])
    return [*head, *_side_fields(key_fp), *_side_fields(value_fp), batch, heads, rows, dim, key_quantized,
            value_quantized, tokens, torch.get_num_threads(), native.double_bits(scale), out.data_ptr()], (query, mask)  # fmt: skip


def fake(query, *args) -> torch.Tensor:
    """Every decode op's fake (meta/tracing) result: (B, H, M, D) float32 like the query."""
    return torch.empty_like(query, dtype=torch.float32)


def reference(
    query: torch.Tensor,
    quantized_scores: Callable[[torch.Tensor], torch.Tensor] | None,
    key_fp,
    weighted_sum: Callable[[torch.Tensor], torch.Tensor] | None,
    value_quantized: int,
    value_fp,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """The decode step composed of torch ops and the method's per-kernel ops: scores over the packed keys
    (``quantized_scores(query)``, None when there are none) and the fp keys, softmax (rows with nothing to
    attend to give 0), then ``weighted_sum(probs[..., :value_quantized])`` plus the fp values.
    Returns (B, H, M, D) float32."""
    query = query.float()
    parts = [quantized_scores(query)] if quantized_scores is not None else []
    parts += [query @ k.float().transpose(-1, -2) for k in key_fp]
    scores = (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]) * scale
    if mask is not None:
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1)
    if mask is not None:
        probs = probs.nan_to_num(0.0)
    out = weighted_sum(probs[..., :value_quantized]) if value_quantized else torch.zeros_like(query)
    start = value_quantized
    for v in value_fp:
        out = out + probs[..., start : start + v.shape[2]] @ v.float()
        start += v.shape[2]
    return out
