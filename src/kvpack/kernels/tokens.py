"""The store's checked token copy (``kvpack_append_tokens`` in ``kernels/csrc/abi.cpp``): an append's new keys
and values checked for NaN/Inf and written into their fp buffers' free slots in one call, instead of two
``isfinite`` reductions and two slice assignments (~25 us of torch dispatch per layer and decode step)."""

from __future__ import annotations

import array
import ctypes

from . import backend, native
from .checks import SCALE_TYPES

__all__ = ["append_tokens"]

_P, _I = ctypes.c_void_p, ctypes.c_int64


class Tokens(ctypes.Structure):
    _fields_ = [("data", _P), ("strides", _I * 4)]


class AppendTokensArgs(ctypes.Structure):
    _fields_ = [("keys", Tokens), ("values", Tokens), ("key_dst", _P), ("key_dst_strides", _I * 3),
                ("value_dst", _P), ("value_dst_strides", _I * 3), ("batch", _I), ("heads", _I), ("tokens", _I),
                ("head_dim", _I), ("type", _I), ("check_finite", _I), ("bad", _P)]  # fmt: skip


native.entry("kvpack_append_tokens", AppendTokensArgs)


def append_tokens(keys, values, key_buffer, key_end: int, value_buffer, value_end: int, check_finite: bool):
    """Write ``keys`` / ``values`` (B, H, T, D, already shape-checked by the layer) at slot ``*_end`` of the
    buffers (B, H, capacity, D) when both are finite (or ``check_finite`` is off).

    Returns None when the fast copy cannot run here or the ``"reference"`` kernel backend is in force (the
    caller then uses torch), else the counts of non-finite values (keys, values): (0, 0) means both were
    written, anything else that neither was.
    """
    dtype = keys.dtype
    if (not keys.is_cpu or backend() == "reference" or native.available() or dtype not in SCALE_TYPES or key_buffer.dtype != dtype
            or value_buffer.dtype != dtype or not value_buffer.is_cpu):  # fmt: skip
        return None
    batch, heads, tokens, dim = keys.shape
    if values.shape != keys.shape or values.dtype != dtype or not values.is_cpu:
        raise ValueError("append_tokens: keys and values differ in shape, dtype or device")  # the layer checks first
    for buffer in (key_buffer, value_buffer):
        if buffer.dim() != 4 or buffer.shape[:2] != (batch, heads) or buffer.shape[3] != dim:
            raise ValueError(f"append_tokens: a buffer of shape {tuple(buffer.shape)} for tokens {tuple(keys.shape)}")
    ks, vs, kb, vb = keys.stride(), values.stride(), key_buffer.stride(), value_buffer.stride()
    if kb[3] != 1 or vb[3] != 1 or key_end + tokens > key_buffer.shape[2] or value_end + tokens > value_buffer.shape[2]:
        raise ValueError("append_tokens: the buffers have no room for the tokens")  # the store reserves it first
    esize = keys.element_size()
    bad = array.array("q", (0, 0))
    native.call_flat("kvpack_append_tokens", [
        keys.data_ptr(), *ks, values.data_ptr(), *vs, key_buffer.data_ptr() + key_end * kb[2] * esize, *kb[:3],
        value_buffer.data_ptr() + value_end * vb[2] * esize, *vb[:3], batch, heads, tokens, dim, SCALE_TYPES[dtype],
        int(check_finite), bad.buffer_info()[0]])  # fmt: skip
    return bad[0], bad[1]
